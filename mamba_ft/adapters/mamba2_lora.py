"""The adapter of one Mamba-2 mixer (`MambaFTMamba2Mixer`): `Mamba2MixerAdapter`.

Given the raw `Mamba2MixerWeights` it returns the weights the forward reads, with the same
mechanisms as Mamba-1's `MixerAdapter` (docs/adapters.md):
- low-rank side paths for the big projections: `in_proj` whole, or any of its row blocks
  `in_proj.z` / `.x` / `.B` / `.C` / `.dt` (one side path whose B matrix is block-structured:
  each block's s·B sits in its rows and its rank's columns, zeros elsewhere, so rows of the
  blocks not adapted get exactly nothing), and `out_proj`;
- an effective weight W + s·B·A for the depthwise conv (`conv1d`, the (conv_dim, width) matrix);
- full, zero-initialised fp32 additive deltas for the vectors: `norm` (the gated RMSNorm's
  weight), `A_log`, `D`, `dt_bias` (each (heads,)).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mamba_ft.adapters.lora import LowRankDelta, MixerAdapterBase, effective, module_key
from mamba_ft.modules.mamba2_mixer import Mamba2MixerWeights
from mamba_ft.ops.projections import LowRankPath

IN_PROJ_BLOCKS = ("in_proj.z", "in_proj.x", "in_proj.B", "in_proj.C", "in_proj.dt")


def in_proj_rows(mixer: nn.Module) -> dict[str, tuple[int, int]]:
    """Rows of in_proj each block covers: [z (d_inner) | x (d_inner) | B | C (groups*N) | dt (heads)]."""
    E, GN, H = mixer.intermediate_size, mixer.n_groups * mixer.ssm_state_size, mixer.num_heads
    sizes = (E, E, GN, GN, H)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return {name: (lo, lo + size) for name, lo, size in zip(IN_PROJ_BLOCKS, starts, sizes)}


class Mamba2MixerAdapter(MixerAdapterBase):
    """Adapters of one Mamba-2 mixer; `forward(raw Mamba2MixerWeights) -> Mamba2MixerWeights`."""

    VECTORS = "delta"

    def __init__(self, mixer: nn.Module, targets: list[str], rank_for, scale_for, dropout: float):
        super().__init__()
        self.in_proj_rows = in_proj_rows(mixer)
        out_rows = max(hi for _, hi in self.in_proj_rows.values())
        hidden, E = mixer.hidden_size, mixer.intermediate_size
        # (out, in) of the matrix each low-rank target changes.
        shapes = {"in_proj": (out_rows, hidden), "out_proj": (hidden, E),
                  "conv1d": (mixer.conv_dim, mixer.conv_kernel_size)}
        shapes |= {name: (hi - lo, hidden) for name, (lo, hi) in self.in_proj_rows.items()}
        self.low_rank = nn.ModuleDict()
        for name in targets:
            if name in shapes:
                # Only the side paths see activations, so only they take dropout.
                p = dropout if name.startswith("in_proj") or name == "out_proj" else 0.0
                self.low_rank[module_key(name)] = LowRankDelta(*shapes[name], rank_for(name),
                                                               scale_for(name), p)
        self.delta = nn.ParameterDict()
        vectors = {"A_log": mixer.A_log, "D": mixer.D, "dt_bias": mixer.dt_bias}
        if mixer.norm is not None:  # Falcon-H1 may have none: `norm` then adapts nothing here
            vectors["norm"] = mixer.norm.weight
        for name in targets:
            if name in vectors:
                self.delta[name] = nn.Parameter(torch.zeros(tuple(vectors[name].shape),
                                                            dtype=torch.float32))

    def _lr(self, name: str) -> LowRankDelta | None:
        key = module_key(name)
        return self.low_rank[key] if key in self.low_rank else None

    def in_proj_path(self) -> LowRankPath | None:
        """in_proj's side path: the whole matrix's, or one built from its adapted row blocks."""
        whole = self._lr("in_proj")
        if whole is not None:
            return whole.side_path()
        blocks = {name: self._lr(name) for name in IN_PROJ_BLOCKS}
        present = [lr for lr in blocks.values() if lr is not None]
        if not present:
            return None
        ref = present[0].lora_A
        total_rank = sum(lr.lora_A.shape[0] for lr in present)
        rows, used = [], 0
        for name, lr in blocks.items():
            lo, hi = self.in_proj_rows[name]
            if lr is None:
                rows.append(ref.new_zeros(hi - lo, total_rank))
                continue
            r = lr.lora_A.shape[0]
            rows.append(torch.cat([ref.new_zeros(hi - lo, used), lr.lora_B * lr.scale,
                                   ref.new_zeros(hi - lo, total_rank - used - r)], dim=1))
            used += r
        A = torch.cat([lr.lora_A for lr in present], dim=0)  # (total rank, hidden)
        return LowRankPath(A=A, B=torch.cat(rows, dim=0), scale=1.0, dropout=present[0].dropout)

    @staticmethod
    def _path_delta(path: LowRankPath) -> torch.Tensor:
        return (path.B @ path.A) * path.scale

    def forward(self, w: Mamba2MixerWeights) -> Mamba2MixerWeights:
        changes = {}
        if (path := self.in_proj_path()) is not None:
            changes["in_proj_lora"] = path
        if (lr := self._lr("out_proj")) is not None:
            changes["out_proj_lora"] = lr.side_path()
        if (lr := self._lr("conv1d")) is not None:
            changes["conv_weight"] = effective(w.conv_weight, lr.delta())
        if "norm" in self.delta:
            changes["norm_weight"] = effective(w.norm_weight, self.delta["norm"])
        # The recurrence parameters stay fp32 (the scan reads them as fp32 anyway).
        for name in ("A_log", "D", "dt_bias"):
            if name in self.delta:
                changes[name] = getattr(w, name).float() + self.delta[name]
        return dataclasses.replace(w, **changes)

    @torch.no_grad()
    def merge_into(self, mixer: nn.Module) -> None:
        """Add every delta to the mixer's own parameters (in place)."""
        def add(param: torch.Tensor, delta: torch.Tensor) -> None:
            param.copy_((param.float() + delta.reshape(param.shape)).to(param.dtype))

        if (path := self.in_proj_path()) is not None:
            add(mixer.in_proj.weight, self._path_delta(path))
        if (lr := self._lr("out_proj")) is not None:
            add(mixer.out_proj.weight, lr.delta())
        if (lr := self._lr("conv1d")) is not None:
            add(mixer.conv1d.weight, lr.delta())
        for name, param in (("norm", getattr(mixer.norm, "weight", None)), ("A_log", mixer.A_log),
                            ("D", mixer.D), ("dt_bias", mixer.dt_bias)):
            if name in self.delta:
                add(param, self.delta[name])
