"""mamba-ft's mixer for transformers' `ZambaMambaMixer`: Mamba-1 whose SSM runs on heads.

Zamba's mixer is Mamba-1 (in_proj -> causal conv -> x_proj -> dt_proj -> gated selective scan
-> out_proj) with two differences, both kept here under transformers' parameter names:

- the d_inner channels after the conv split into `n_mamba_heads` heads of head_dim channels,
  each with its own x_proj, dt_proj, dt bias, A and D, stored stacked as raw parameters:
  `x_proj_weight` (heads, R + 2N, head_dim), `dt_proj_weight` (heads, head_dim, R),
  `dt_proj_bias` and `D` (heads, head_dim), `A_log` (heads, head_dim, N). Each head is a
  Mamba-1 SSM over its channels with its own B and C; the scan runs once per head;
- in_proj's output rows interleave x and the gate: row 2c is x's channel c, row 2c + 1 z's.

Everything else is `MambaFTMixer`'s: the same forward, weights read through `mixer_weights()`
(adapters give per-head effective weights in the stacked layout), the same ops, and the cache
(transformers' linear-attention cache) read and written as transformers' Zamba does: conv
window (batch, d_inner, width), recurrent state (batch, heads, head_dim, N).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mamba_ft.modules.mamba_mixer import MambaFTMixer, MixerWeights


class MambaFTZambaMixer(MambaFTMixer):
    """Drop-in for transformers' `ZambaMambaMixer` (same parameters, same forward signature)."""

    def _take_parameters(self, hf_mixer: nn.Module) -> None:
        self.n_heads = hf_mixer.n_mamba_heads
        self.head_dim = hf_mixer.mamba_head_dim
        if self.n_heads * self.head_dim != self.intermediate_size:
            raise ValueError(f"n_mamba_heads * head_dim ({self.n_heads} * {self.head_dim}) must "
                             f"equal the intermediate size {self.intermediate_size}")
        # Registration order as in transformers, so named_parameters() lists the same order.
        self.conv1d = hf_mixer.conv1d
        self.in_proj = hf_mixer.in_proj
        self.x_proj_weight = hf_mixer.x_proj_weight
        self.dt_proj_weight = hf_mixer.dt_proj_weight
        self.dt_proj_bias = hf_mixer.dt_proj_bias
        self.A_log = hf_mixer.A_log
        self.D = hf_mixer.D
        self.out_proj = hf_mixer.out_proj

    def _ssm_projection_parameters(self) -> dict[str, nn.Parameter]:
        return {"x_proj": self.x_proj_weight, "dt_proj": self.dt_proj_weight,
                "dt_bias": self.dt_proj_bias}

    def _ssm_projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x_proj_weight, self.dt_proj_weight, self.dt_proj_bias

    def _split_xz(self, xz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Rows interleaved: strided views, each channel still contiguous along time.
        return xz[:, 0::2], xz[:, 1::2]

    def _head(self, w: MixerWeights, h: int) -> MixerWeights:
        """Head h's weights, in the single-SSM layout `MambaFTMixer` reads."""
        return dataclasses.replace(w, x_proj_weight=w.x_proj_weight[h],
                                   dt_proj_weight=w.dt_proj_weight[h], dt_bias=w.dt_bias[h],
                                   D=w.D[h])

    def _selective_ssm(self, x, z, w: MixerWeights, A, ssm_state, return_last_state: bool):
        """Mamba-1's SSM on each head's channels; y (batch, d_inner, L) and the final state
        (batch, heads, head_dim, N), transformers' Zamba cache layout."""
        ys, states = [], []
        for h in range(self.n_heads):
            c = slice(h * self.head_dim, (h + 1) * self.head_dim)
            result = super()._selective_ssm(x[:, c], z[:, c], self._head(w, h), A[h],
                                            None if ssm_state is None else ssm_state[:, h],
                                            return_last_state)
            if return_last_state:
                result, state = result
                states.append(state)
            ys.append(result)
        y = torch.cat(ys, dim=1)
        return (y, torch.stack(states, dim=1)) if return_last_state else y

    def _selective_step(self, x, z, w: MixerWeights, A, ssm_state, out=None):
        """Per head; each head's new state written into its slice of `out` if given."""
        ys, states = [], []
        for h in range(self.n_heads):
            c = slice(h * self.head_dim, (h + 1) * self.head_dim)
            y, state = super()._selective_step(x[:, c], z[:, c], self._head(w, h), A[h],
                                               ssm_state[:, h],
                                               out=None if out is None else out[:, h])
            ys.append(y)
            states.append(state)
        return torch.cat(ys, dim=1), out if out is not None else torch.stack(states, dim=1)
