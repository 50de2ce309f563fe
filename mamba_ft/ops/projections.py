"""The mixer's projections, computed in the layouts the kernels read, without copies.

The scan and conv kernels read each channel's sequence, so the SSM branch works on
channels-first tensors (batch, channels, L), contiguous along time, while the residual stream
is (batch, L, hidden). Each projection here takes one layout and returns the other (or the
same) directly from cuBLAS: a batched GEMM whose weight is broadcast over the batch (batch
stride 0) and whose transposed operands are read in place. `torch.matmul` and `F.linear` would
instead copy a transposed input, and copy their output again, at every call and in the
backward (measured: about a third of a training step's GPU time, docs/benchmarks.md).

Gradients come back in the layout their input had, so no copy happens in the backward either.

The weight of in_proj / out_proj may also be a quantised one (`QuantizedWeight`: anything with
`shape` and `dequantize(dtype)`, e.g. `mamba_ft.modules.quantized`'s bitsandbytes wrapper). The
GEMM then reads it dequantised into the compute dtype, and the autograd functions keep only the
quantised object for the backward and dequantise it again there: saving the dequantised
matrix instead would hold every layer's full-precision weight until the backward, which is
the memory quantisation exists to save. A quantised weight is frozen (no gradient), while
the input, and so every adapter feeding or reading it, gets one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LowRankPath:
    """y += scale * dropout(x) A^T B^T, the LoRA side path of a projection."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: nn.Module | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The side path on rows (..., in) -> (..., out), as for the lm_head."""
        if self.dropout is not None:
            x = self.dropout(x)
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale


@runtime_checkable
class QuantizedWeight(Protocol):
    """A frozen (out, in) weight stored quantised, materialised only for the GEMM."""

    shape: torch.Size

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) matrix in `dtype`, without a gradient."""
        ...


def _dense(w, dtype: torch.dtype | None) -> torch.Tensor:
    return w if isinstance(w, torch.Tensor) else w.dequantize(dtype)


def _save_weight(ctx, w, dtype) -> torch.Tensor | None:
    # A tensor weight is saved as autograd saves it (no copy); a quantised one is kept as the
    # quantised object and dequantised again in the backward (see the module docstring).
    ctx.quantized, ctx.dtype = (None, None) if isinstance(w, torch.Tensor) else (w, dtype)
    return w if isinstance(w, torch.Tensor) else None


def _saved_weight(ctx, saved: torch.Tensor | None) -> torch.Tensor:
    return saved if ctx.quantized is None else ctx.quantized.dequantize(ctx.dtype)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in: autocast's where it is on, else `t`'s own."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _broadcast(w: torch.Tensor, batch: int) -> torch.Tensor:
    # A stride-0 batch view: cuBLAS's strided-batched GEMM reads the one matrix b times.
    return w.expand(batch, *w.shape)


class _RowsToChannelsFirst(torch.autograd.Function):
    """(batch, L, in) x (out, in) -> (batch, out, L), i.e. W @ x^T per batch row."""

    @staticmethod
    def forward(ctx, x, w, dtype=None):
        # The input is kept only for the weight's gradient (a frozen weight needs none).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, _save_weight(ctx, w, dtype))
        return torch.bmm(_broadcast(_dense(w, dtype), x.shape[0]), x.mT)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        w = _saved_weight(ctx, w)
        dx = torch.bmm(g.mT, _broadcast(w, g.shape[0])) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(g, x).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class _ChannelsFirstToRows(torch.autograd.Function):
    """(batch, in, L) x (out, in) -> (batch, L, out), i.e. y^T @ W^T per batch row."""

    @staticmethod
    def forward(ctx, y, w, dtype=None):
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, _save_weight(ctx, w, dtype))
        return torch.bmm(y.mT, _broadcast(_dense(w, dtype).t(), y.shape[0]))

    @staticmethod
    def backward(ctx, g):
        y, w = ctx.saved_tensors
        w = _saved_weight(ctx, w)
        dy = torch.bmm(_broadcast(w.t(), g.shape[0]), g.mT) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(g.mT, y.mT).sum(0) if ctx.needs_input_grad[1] else None
        return dy, dw, None


class _Rows(torch.autograd.Function):
    """(..., in) x (out, in) -> (..., out) for a frozen quantised weight: dequantised in the
    forward and again in the backward, never saved (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w, dtype):
        ctx.quantized, ctx.dtype = w, dtype
        return F.linear(x, w.dequantize(dtype))

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.quantized.dequantize(ctx.dtype), None, None


def _weight_in(weight, dtype: torch.dtype):
    """A tensor weight cast to `dtype`; a quantised one as it is (dequantised in the GEMM)."""
    return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight


def rows_to_channels_first(x, weight, bias=None, lora: LowRankPath | None = None):
    """(batch, L, in) -> (batch, out, L), contiguous along time: the mixer's in_proj.

    `weight`: an (out, in) tensor or a `QuantizedWeight`."""
    dtype = compute_dtype(x)
    x, w = x.to(dtype), _weight_in(weight, dtype)
    y = _RowsToChannelsFirst.apply(x, w, dtype)
    if bias is not None:
        y = y + bias.to(dtype)[:, None]
    if lora is not None:
        xd = x if lora.dropout is None else lora.dropout(x)
        h = _RowsToChannelsFirst.apply(xd, lora.A.to(dtype))  # (batch, rank, L)
        y = torch.baddbmm(y, _broadcast(lora.B.to(dtype), x.shape[0]), h, alpha=lora.scale)
    return y


def channels_first_to_rows(y, weight, bias=None, lora: LowRankPath | None = None):
    """(batch, in, L) -> (batch, L, out), contiguous: the mixer's out_proj.

    `weight`: an (out, in) tensor or a `QuantizedWeight`."""
    dtype = compute_dtype(y)
    y, w = y.to(dtype), _weight_in(weight, dtype)
    out = _ChannelsFirstToRows.apply(y, w, dtype)
    if bias is not None:
        out = out + bias.to(dtype)
    if lora is not None:
        yd = y if lora.dropout is None else lora.dropout(y)
        h = channels_first(yd, lora.A)  # (batch, rank, L)
        # Accumulated by the GEMM into `out` (beta 1), with the scale folded into the small B:
        # no separate multiply and add over the (batch, L, out) activations, either way.
        B = (lora.B * lora.scale).to(dtype)
        out = torch.baddbmm(out, h.mT, _broadcast(B.t(), y.shape[0]))
    return out


def rows(x, weight, bias=None, lora: LowRankPath | None = None):
    """(..., in) -> (..., out), rows to rows: Mamba-2's in_proj and out_proj, whose kernels
    read (batch, L, channels) tensors, so `F.linear` already meets their layout.

    `weight`: an (out, in) tensor or a `QuantizedWeight`."""
    if isinstance(weight, torch.Tensor):
        out = F.linear(x, weight, bias)
    else:
        dtype = compute_dtype(x)
        out = _Rows.apply(x.to(dtype), weight, dtype)
        if bias is not None:
            out = out + bias.to(dtype)
    return out if lora is None else out + lora(x).to(out.dtype)


def channels_first(x, weight):
    """(batch, in, L) -> (batch, out, L), W @ x per batch row: x_proj and dt_proj.

    Plain autograd gives both gradients contiguous here (W^T @ g and g @ x^T).
    """
    dtype = compute_dtype(x)
    x, w = x.to(dtype), weight.to(dtype)
    return torch.bmm(_broadcast(w, x.shape[0]), x)
