"""Replace transformers' Mamba mixers and RMSNorms by mamba-ft's, in place.

Mamba-1 (`MambaMixer`, `MambaRMSNorm`) and Mamba-2 (`Mamba2Mixer`, whose gated norm the mixer
takes over, and `Mamba2RMSNorm`, the blocks' and the final norm: the same formula as
`MambaRMSNorm`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers.models.mamba.modeling_mamba import MambaMixer, MambaRMSNorm
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer, Mamba2RMSNorm

from mamba_ft.compat import warn_if_untested_transformers
from mamba_ft.modules import (MIXER_CLASSES, MambaFTMamba2Mixer, MambaFTMixer,
                              MambaFTRMSNorm)


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
    """Swap every transformers MambaMixer / Mamba2Mixer for mamba-ft's, holding the same tensors.

    Returns how many were swapped. Parameter names and shapes do not change, so state dicts,
    optimizers built afterwards and `save_pretrained` behave as with plain transformers.
    """
    warn_if_untested_transformers()
    return _swap(model, MambaMixer, MambaFTMixer) + _swap(model, Mamba2Mixer, MambaFTMamba2Mixer)


def swap_norms(model: nn.Module) -> int:
    """Swap every transformers MambaRMSNorm / Mamba2RMSNorm for a MambaFTRMSNorm holding the
    same weight."""
    return _swap(model, MambaRMSNorm, MambaFTRMSNorm) + _swap(model, Mamba2RMSNorm, MambaFTRMSNorm)


def mixers(model: nn.Module) -> list[MambaFTMixer | MambaFTMamba2Mixer]:
    """Every mamba-ft mixer in the model, Mamba-1 and Mamba-2 alike."""
    return [m for m in model.modules() if isinstance(m, MIXER_CLASSES)]


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
    and the scan's chunk states are rebuilt by running conv -> x_proj -> dt_proj -> scan
    (Mamba-2: conv -> SSD scan) once more. Returns how many mixers were set.
    """
    targets = mixers(model)
    for mixer in targets:
        mixer.recompute_ssm = enabled
    return len(targets)
