"""Mamba-2's gated RMSNorm: transformers' `Mamba2RMSNormGated` parameter, the same formula
(`mamba_ft.ops.gated_rms_norm`: a Triton kernel on CUDA, `ops.reference` elsewhere).

The mixer's output is gated by silu(z) and then normalised per group of channels (n_groups
groups of intermediate_size / n_groups channels each), all in fp32, then cast back to the
input's dtype before the weight multiplies it: gate first, then norm, as transformers and
mamba_ssm (norm_before_gate=False) compute it. Falcon-H1 may norm first and gate after
(`norm_before_gate`).
"""

from __future__ import annotations

import torch
from torch import nn

from mamba_ft import ops


class MambaFTRMSNormGated(nn.Module):
    """transformers' Mamba2RMSNormGated (same `weight` parameter object).

    Inside mamba-ft's Mamba-2 mixer it only holds the weight under its transformers name: the
    mixer calls `ops.gated_rms_norm` with the weight `mixer_weights()` returns (so an adapter can
    substitute it). Its own forward serves anyone calling it as transformers' module.
    """

    def __init__(self, hf_norm: nn.Module):
        super().__init__()
        self.weight = hf_norm.weight
        self.variance_epsilon = hf_norm.variance_epsilon
        # Falcon-H1's norm names its groups by count; the others by size.
        self.group_size = getattr(hf_norm, "group_size", None) or (
            hf_norm.weight.numel() // hf_norm.n_groups)
        self.norm_before_gate = bool(getattr(hf_norm, "norm_before_gate", False))

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None):
        return ops.gated_rms_norm(hidden_states, gate, self.weight, self.variance_epsilon,
                                  self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, group_size={self.group_size}, "
                f"eps={self.variance_epsilon}")
