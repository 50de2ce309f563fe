"""Tiny fp32 Mamba models for the adapter tests (2 layers, d_model 32, vocab 64: milliseconds each)."""

from __future__ import annotations

import copy

import torch
from transformers import MambaConfig, MambaForCausalLM

from mamba_ft.adapters import adapter_parameters
from mamba_ft.models import swap_mixers

VOCAB = 64


def tiny_config(hidden_size: int = 32, tie: bool = True) -> MambaConfig:
    # time_step_rank = ceil(32/16) = 2, so x_proj rows are [dt 2 | B 8 | C 8].
    return MambaConfig(vocab_size=VOCAB, hidden_size=hidden_size, state_size=8, num_hidden_layers=2,
                       expand=2, conv_kernel=4, tie_word_embeddings=tie)


def plain_mamba(seed: int = 0, hidden_size: int = 32, tie: bool = True) -> MambaForCausalLM:
    """transformers' own MambaForCausalLM (its own mixer), random init."""
    torch.manual_seed(seed)
    return MambaForCausalLM(tiny_config(hidden_size, tie)).float()


def ft_copy(model: MambaForCausalLM) -> MambaForCausalLM:
    """The same weights with mamba-ft's mixers."""
    out = copy.deepcopy(model)
    swap_mixers(out)
    return out


def randomize_adapters(model, seed: int = 1, std: float = 0.1) -> None:
    """Non-zero adapter weights (LoRA starts with B = 0, which hides A's gradient and the delta)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * std)
