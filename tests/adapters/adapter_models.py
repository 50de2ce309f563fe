"""Tiny fp32 Mamba-1 and Mamba-2 models for the adapter tests (2 layers, d_model 32: milliseconds each)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from mamba_ft.adapters import adapter_parameters
from mamba_ft.models import swap_mixers

VOCAB = 64
MAMBA2_VOCAB = 96


def tiny_config(hidden_size: int = 32, tie: bool = True) -> MambaConfig:
    # time_step_rank = ceil(32/16) = 2, so x_proj rows are [dt 2 | B 8 | C 8].
    return MambaConfig(vocab_size=VOCAB, hidden_size=hidden_size, state_size=8, num_hidden_layers=2,
                       expand=2, conv_kernel=4, tie_word_embeddings=tie)


def plain_mamba(seed: int = 0, hidden_size: int = 32, tie: bool = True) -> MambaForCausalLM:
    """transformers' own MambaForCausalLM (its own mixer), random init."""
    torch.manual_seed(seed)
    return MambaForCausalLM(tiny_config(hidden_size, tie)).float()


def tiny_mamba2_config(tie: bool = False, hidden_size: int = 32) -> Mamba2Config:
    # 8 heads of 8 channels in 2 groups, state 8, chunks of 8, so in_proj's rows are
    # [z 64 | x 64 | B 16 | C 16 | dt 8] = 168 and conv1d has 96 channels.
    return Mamba2Config(vocab_size=MAMBA2_VOCAB, hidden_size=hidden_size, expand=2,
                        num_heads=hidden_size // 4, head_dim=8, n_groups=2, state_size=8,
                        num_hidden_layers=2, conv_kernel=4, chunk_size=8, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)


def plain_mamba2(seed: int = 0, **kw) -> Mamba2ForCausalLM:
    """transformers' own Mamba2ForCausalLM, random init; D and the gated norm's weight moved off
    their 1.0 start so a wrong D or norm path shows."""
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(tiny_mamba2_config(**kw)).float()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Mamba2Mixer):
                module.D.normal_()
                module.norm.weight.normal_(1.0, 0.2)
    return model


def ft_copy(model):
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


def assert_merged_rows(base, merged, weight: str, n_rows: int, rows: tuple[int, int]) -> None:
    """In both layers, merging changed exactly rows [rows[0], rows[1]) of the mixer's `weight`."""
    for layer in range(2):
        name = f"backbone.layers.{layer}.mixer.{weight}.weight"
        changed = (merged.state_dict()[name] != base.state_dict()[name]).any(dim=1)
        expected = torch.zeros(n_rows, dtype=torch.bool)
        expected[rows[0]:rows[1]] = True
        assert torch.equal(changed, expected)


def assert_guard_names_layer_0(model, ids, dead: int, total: int) -> None:
    """`targets: [all]` attached: with layer 0 reading its raw weights (as a kernel fed `.weight`
    would), the guard refuses before any backward, then names exactly layer 0's parameters."""
    from mamba_ft.adapters import AdapterConfig, attach_adapters, check_adapter_gradients
    from mamba_ft.errors import UserError
    from mamba_ft.models import mixers

    attach_adapters(model, AdapterConfig(targets=["all"], rank=2))
    with pytest.raises(UserError, match="received no gradient"):  # no backward yet
        check_adapter_gradients(model)
    first = mixers(model)[0]
    first.mixer_weights = first.raw_weights
    model(ids, labels=ids).loss.backward()
    with pytest.raises(UserError) as err:
        check_adapter_gradients(model)
    message = str(err.value)
    assert f"{dead} of {total} adapter parameters" in message
    assert "backbone.layers.0.mixer.adapter.low_rank.in_proj.lora_A" in message
    assert "layers.1." not in message
