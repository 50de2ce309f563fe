"""Mamba-2's gated RMSNorm: transformers' `Mamba2RMSNormGated` parameter, the same formula.

The mixer's output is gated by silu(z) and then normalised per group of channels (n_groups
groups of intermediate_size / n_groups channels each), all in fp32, then cast back to the
input's dtype before the weight multiplies it: gate first, then norm, as transformers and
mamba_ssm (norm_before_gate=False) compute it. Falcon-H1 may norm first and gate after
(`norm_before_gate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   group_size: int, norm_before_gate: bool = False) -> torch.Tensor:
    """weight * RMSNorm_per_group(x * silu(gate)), statistics in fp32. x, gate: (..., d).

    `norm_before_gate` (Falcon-H1's option): (weight * RMSNorm_per_group(x)) * silu(gate),
    weight and gate applied in fp32 before the cast back, as transformers' FalconH1 computes it.
    """
    input_dtype = x.dtype
    h = x.float()
    if gate is not None and not norm_before_gate:
        h = h * F.silu(gate.float())
    *prefix, d = h.shape
    grouped = h.view(*prefix, d // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    if norm_before_gate:
        out = weight.float() * grouped.view(*prefix, d)
        return (out if gate is None else out * F.silu(gate.float())).to(input_dtype)
    return weight * grouped.view(*prefix, d).to(input_dtype)


class MambaFTRMSNormGated(nn.Module):
    """transformers' Mamba2RMSNormGated (same `weight` parameter object).

    Inside mamba-ft's Mamba-2 mixer it only holds the weight under its transformers name: the
    mixer calls `gated_rms_norm` with the weight `mixer_weights()` returns (so an adapter can
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
        return gated_rms_norm(hidden_states, gate, self.weight, self.variance_epsilon,
                              self.group_size, self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, group_size={self.group_size}, "
                f"eps={self.variance_epsilon}")
