"""Replace transformers' MambaMixer and MambaRMSNorm modules by mamba-ft's, in place."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers.models.mamba.modeling_mamba import MambaMixer, MambaRMSNorm

from mamba_ft import ops
from mamba_ft.compat import warn_if_untested_transformers
from mamba_ft.mixer import MambaFTMixer


def _swap(model: nn.Module, hf_class: type, replacement) -> int:
    """Replace every child module of `hf_class` by `replacement(child)`; return how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, hf_class):
                setattr(module, name, replacement(child))
                swapped += 1
    return swapped


def swap_mixers(model: nn.Module) -> int:
    """Swap every transformers MambaMixer for a MambaFTMixer holding the same tensors.

    Returns how many were swapped. Parameter names and shapes do not change, so state dicts,
    optimizers built afterwards and `save_pretrained` behave as with plain transformers.
    """
    warn_if_untested_transformers()
    return _swap(model, MambaMixer, MambaFTMixer)


class MambaFTRMSNorm(nn.Module):
    """transformers' MambaRMSNorm (same `weight` parameter object), through `mamba_ft.ops`:
    one fused Triton kernel each way on CUDA, the same formula elsewhere."""

    def __init__(self, hf_norm: nn.Module):
        super().__init__()
        self.weight = hf_norm.weight
        self.variance_epsilon = hf_norm.variance_epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def swap_norms(model: nn.Module) -> int:
    """Swap every transformers MambaRMSNorm for a MambaFTRMSNorm holding the same weight."""
    return _swap(model, MambaRMSNorm, MambaFTRMSNorm)


def mixers(model: nn.Module) -> list[MambaFTMixer]:
    return [m for m in model.modules() if isinstance(m, MambaFTMixer)]


@contextmanager
def document_starts(model: nn.Module, starts: torch.Tensor | None):
    """Within the block, mixers treat `starts` (batch, L) bool as document boundaries.

    Packed rows hold several documents; at each start the recurrent state and the conv window
    begin afresh, so no document sees another. Run the backward inside the block too: gradient
    checkpointing recomputes the forward there.
    """
    targets = mixers(model)
    for mixer in targets:
        mixer.document_starts = starts
    try:
        yield
    finally:
        for mixer in targets:
            mixer.document_starts = None


def set_recompute_ssm(model: nn.Module, enabled: bool) -> int:
    """Recompute each mixer's SSM branch in the backward instead of storing its activations.

    Per layer the backward then keeps only the in_proj output; the conv output, delta, B, C
    and the scan's chunk states are rebuilt by running conv -> x_proj -> dt_proj -> scan once
    more. Returns how many mixers were set.
    """
    targets = mixers(model)
    for mixer in targets:
        mixer.recompute_ssm = enabled
    return len(targets)
