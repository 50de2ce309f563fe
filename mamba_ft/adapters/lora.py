"""mamba-ft's adapter modules for Mamba models.

- `LowRankDelta`: scale * B @ A on a weight matrix (A: (rank, in), B: (out, rank), fp32), or
  on each of a stack of them (A: (heads, rank, in), B: (heads, out, rank)).
- `MixerAdapter`: the `mixer.adapter` of one `MambaFTMixer` (Mamba-1, Zamba's Mamba-1 on heads
  too; Mamba-2's is in `mamba2_lora.py`). Given the raw `MixerWeights` it returns the weights
  the forward reads: effective weights W + s·B·A for the small buffers the kernels take whole
  (x_proj, its dt/B/C row blocks, dt_proj, conv1d; Zamba's x_proj and dt_proj per head, one
  rank-r delta each), low-rank side paths for the big projections (in_proj, out_proj:
  measured faster, see docs/adapters.md), and A_log / D / dt_bias plus a zero-initialised
  fp32 delta of their shape.
- `EmbeddingAdapter` / `HeadAdapter`: children of the model's input embedding and output
  Linear, applied by a forward hook (the module stays the same object, so weight tying and
  transformers' accessors keep working).

Effective weights are built in fp32 (the adapter's dtype) and cast to the base weight's dtype,
so a bf16 base with fp32 adapters differentiates through one cast.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from mamba_ft.modules.mamba_mixer import MixerWeights
from mamba_ft.ops.projections import LowRankPath


class LowRankDelta(nn.Module):
    """delta = scale * lora_B @ lora_A, initialised like PEFT's LoRA (B = 0: no change at start).

    With `heads`, a stack of independent deltas, one per head: (heads, out, in)."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float,
                 dropout: float = 0.0, heads: int | None = None):
        super().__init__()
        stack = () if heads is None else (heads,)
        self.lora_A = nn.Parameter(torch.empty(*stack, rank, in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(*stack, out_features, rank, dtype=torch.float32))
        # Each head's A as a matrix of its own (fan-in `in_features`, as PEFT's).
        for a in (self.lora_A,) if heads is None else self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def side_path(self) -> LowRankPath:
        return LowRankPath(A=self.lora_A, B=self.lora_B, scale=self.scale, dropout=self.dropout)


def effective(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + delta, summed in fp32 and cast to W's dtype (what the op consumes)."""
    return (weight.float() + delta).to(weight.dtype)


class MixerAdapterBase(nn.Module):
    """What every mixer family's adapter shares: low-rank deltas in `low_rank` (keyed by
    `module_key`) and full vector deltas in a ParameterDict whose attribute name
    `VECTORS` gives (it is part of the saved parameter names, so each family keeps its own)."""

    VECTORS: str

    def holds(self, target: str) -> bool:
        """Whether this mixer has the buffer `target` names (a Falcon-H1 mixer without its norm
        has no `norm`)."""
        return target in getattr(self, self.VECTORS) or module_key(target) in self.low_rank

    def target_numel(self, target: str) -> int:
        vectors = getattr(self, self.VECTORS)
        if target in vectors:
            return vectors[target].numel()
        return sum(p.numel() for p in self.low_rank[module_key(target)].parameters())


class MixerAdapter(MixerAdapterBase):
    """Adapters of one mixer; `forward(raw MixerWeights) -> MixerWeights` (the mixer's hook)."""

    VECTORS = "ssm"

    def __init__(self, mixer: nn.Module, targets: list[str], rank_for, scale_for, dropout: float):
        super().__init__()
        E, R, N = mixer.intermediate_size, mixer.time_step_rank, mixer.ssm_state_size
        D, K = mixer.hidden_size, mixer.conv_kernel_size
        # Zamba's mixer holds x_proj and dt_proj per head (`heads` of them, each over head_dim
        # channels): their deltas are stacks of one per head. Plain Mamba-1's are one matrix.
        heads = mixer.n_heads
        Eh = E if heads is None else E // heads
        # (out, in) of the matrix each low-rank target changes.
        shapes = {"in_proj": (2 * E, D), "out_proj": (D, E), "x_proj": (R + 2 * N, Eh),
                  "x_proj.dt": (R, Eh), "x_proj.B": (N, Eh), "x_proj.C": (N, Eh),
                  "dt_proj": (Eh, R), "conv1d": (E, K)}
        per_head = ("x_proj", "x_proj.dt", "x_proj.B", "x_proj.C", "dt_proj")
        # Rows of x_proj each block covers.
        self.x_proj_rows = {"x_proj.dt": (0, R), "x_proj.B": (R, R + N), "x_proj.C": (R + N, R + 2 * N)}
        self.x_proj_lead = () if heads is None else (heads,)  # x_proj's leading axes
        self.x_proj_in = Eh
        self.low_rank = nn.ModuleDict()
        for name in targets:
            if name in shapes:
                # Only the side paths see activations, so only they take dropout.
                p = dropout if name in ("in_proj", "out_proj") else 0.0
                self.low_rank[module_key(name)] = LowRankDelta(
                    *shapes[name], rank_for(name), scale_for(name), p,
                    heads=heads if name in per_head else None)
        self.ssm = nn.ParameterDict()
        base = mixer.base_parameters()
        for name in targets:
            if name in ("A_log", "D", "dt_bias"):
                self.ssm[name] = nn.Parameter(torch.zeros(base[name].shape, dtype=torch.float32))

    def _lr(self, name: str) -> LowRankDelta | None:
        key = module_key(name)
        return self.low_rank[key] if key in self.low_rank else None

    def x_proj_delta(self) -> torch.Tensor | None:
        whole = self._lr("x_proj")
        if whole is not None:
            return whole.delta()
        blocks = {name: self._lr(name) for name in self.x_proj_rows}
        if not any(b is not None for b in blocks.values()):
            return None
        device = next(b for b in blocks.values() if b is not None).lora_A.device
        # Rows of the blocks not adapted stay as they are (a zero delta).
        parts = [block.delta() if block is not None else
                 torch.zeros(*self.x_proj_lead, hi - lo, self.x_proj_in, dtype=torch.float32,
                             device=device)
                 for block, (lo, hi) in zip(blocks.values(), self.x_proj_rows.values())]
        return torch.cat(parts, dim=-2)

    def conv_delta(self) -> torch.Tensor | None:
        conv = self._lr("conv1d")
        return None if conv is None else conv.delta()

    def forward(self, w: MixerWeights) -> MixerWeights:
        changes = {}
        if (lr := self._lr("in_proj")) is not None:
            changes["in_proj_lora"] = lr.side_path()
        if (lr := self._lr("out_proj")) is not None:
            changes["out_proj_lora"] = lr.side_path()
        if (delta := self.x_proj_delta()) is not None:
            changes["x_proj_weight"] = effective(w.x_proj_weight, delta)
        if (lr := self._lr("dt_proj")) is not None:
            changes["dt_proj_weight"] = effective(w.dt_proj_weight, lr.delta())
        if (delta := self.conv_delta()) is not None:
            changes["conv_weight"] = effective(w.conv_weight, delta)
        # The recurrence parameters stay fp32 (the scan reads them as fp32 anyway).
        for name, field in (("A_log", "A_log"), ("D", "D"), ("dt_bias", "dt_bias")):
            if name in self.ssm:
                changes[field] = getattr(w, field).float() + self.ssm[name]
        return dataclasses.replace(w, **changes)

    @torch.no_grad()
    def merge_into(self, mixer: nn.Module) -> None:
        """Add every delta to the mixer's own parameters (in place), in their layout."""
        def add(param: torch.Tensor, delta: torch.Tensor) -> None:
            param.copy_((param.float() + delta.reshape(param.shape)).to(param.dtype))

        base = mixer.base_parameters()
        for name in ("in_proj", "out_proj", "dt_proj"):
            if (lr := self._lr(name)) is not None:
                add(base[name], lr.delta())
        if (delta := self.x_proj_delta()) is not None:
            add(base["x_proj"], delta)
        if (delta := self.conv_delta()) is not None:
            add(base["conv1d"], delta)
        for name, delta in self.ssm.items():
            add(base[name], delta)


def module_key(target: str) -> str:
    """ModuleDict keys cannot hold dots: x_proj.dt -> x_proj_dt."""
    return target.replace(".", "_")


class EmbeddingAdapter(nn.Module):
    """LoRA on an nn.Embedding, PEFT's layout: A (rank, vocab) = 0, B (dim, rank) ~ N(0, 1)."""

    def __init__(self, num_embeddings: int, dim: int, rank: int, scale: float):
        super().__init__()
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, num_embeddings, dtype=torch.float32))
        self.lora_embedding_B = nn.Parameter(torch.randn(dim, rank, dtype=torch.float32))
        self.scale = scale

    def delta(self) -> torch.Tensor:  # (vocab, dim)
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.lora_embedding_A.T) @ self.lora_embedding_B.T * self.scale


class HeadAdapter(LowRankDelta):
    """LoRA side path on the output Linear (lm_head)."""


def _embedding_hook(module: nn.Module, args, output):
    adapter = getattr(module, "adapter", None)
    return output if adapter is None else output + adapter(args[0]).to(output.dtype)


def _head_hook(module: nn.Module, args, output):
    adapter = getattr(module, "adapter", None)
    return output if adapter is None else output + adapter.side_path()(args[0]).to(output.dtype)


def add_module_adapter(module: nn.Module, adapter: nn.Module) -> None:
    """Make `adapter` a child of `module` (so its parameters are the model's) and apply it."""
    module.adapter = adapter
    hook = _embedding_hook if isinstance(adapter, EmbeddingAdapter) else _head_hook
    adapter.hook_handle = module.register_forward_hook(hook)


def remove_module_adapter(module: nn.Module) -> None:
    adapter = module.adapter
    adapter.hook_handle.remove()
    del module.adapter
