"""mamba-ft's RMSNorm: transformers' `MambaRMSNorm` parameter, mamba-ft's ops."""

from __future__ import annotations

import torch
from torch import nn

from mamba_ft import ops


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
