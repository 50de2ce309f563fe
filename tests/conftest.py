"""Shared fixtures: tiny models built in the test, never downloaded."""

from __future__ import annotations

import os

import pytest
import torch

# No test may reach the Hugging Face Hub: fail fast instead of retrying a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Every test starts from accelerate's defaults. accelerate keeps one process-wide
    AcceleratorState, and an `Accelerator()` made later silently takes the mixed precision an
    earlier one set: a bf16 training run left behind by one test turned a later test's fp32
    comparison into a bf16 one. The process group (PartialState) is kept."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()


@pytest.fixture
def tiny_mamba_config():
    from transformers import MambaConfig

    return MambaConfig(vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2,
                       expand=2, conv_kernel=4, time_step_rank=4)


@pytest.fixture
def tiny_mamba2_config():
    """8 heads of 8 channels in 2 groups, chunks of 8 (tests use lengths that are not
    multiples of it)."""
    from transformers import Mamba2Config

    return Mamba2Config(vocab_size=96, hidden_size=32, expand=2, num_heads=8, head_dim=8,
                        n_groups=2, state_size=8, num_hidden_layers=2, conv_kernel=4,
                        chunk_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_word_tokenizer(directory, words=None):
    """A small word-level tokenizer saved as a transformers tokenizer in `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or [f"w{i}" for i in range(80)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return fast


@pytest.fixture
def word_tokenizer_factory():
    return build_word_tokenizer


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
