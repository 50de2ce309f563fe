"""The mixer's projections, computed in the layouts the kernels read, without copies.

The scan and conv kernels read each channel's sequence, so the SSM branch works on
channels-first tensors (batch, channels, L), contiguous along time, while the residual stream
is (batch, L, hidden). Each projection here takes one layout and returns the other (or the
same) directly from cuBLAS: a batched GEMM whose weight is broadcast over the batch (batch
stride 0) and whose transposed operands are read in place. `torch.matmul` and `F.linear` would
instead copy a transposed input, and copy their output again, at every call and in the
backward (measured: about a third of a training step's GPU time, docs/benchmarks.md).

Gradients come back in the layout their input had, so no copy happens in the backward either.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def forward(ctx, x, w):
        # The input is kept only for the weight's gradient (a frozen weight needs none).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        return torch.bmm(_broadcast(w, x.shape[0]), x.mT)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx = torch.bmm(g.mT, _broadcast(w, g.shape[0])) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(g, x).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw


class _ChannelsFirstToRows(torch.autograd.Function):
    """(batch, in, L) x (out, in) -> (batch, L, out), i.e. y^T @ W^T per batch row."""

    @staticmethod
    def forward(ctx, y, w):
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, w)
        return torch.bmm(y.mT, _broadcast(w.t(), y.shape[0]))

    @staticmethod
    def backward(ctx, g):
        y, w = ctx.saved_tensors
        dy = torch.bmm(_broadcast(w.t(), g.shape[0]), g.mT) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(g.mT, y.mT).sum(0) if ctx.needs_input_grad[1] else None
        return dy, dw


def rows_to_channels_first(x, weight, bias=None, lora: LowRankPath | None = None):
    """(batch, L, in) -> (batch, out, L), contiguous along time: the mixer's in_proj."""
    dtype = compute_dtype(x)
    x, w = x.to(dtype), weight.to(dtype)
    y = _RowsToChannelsFirst.apply(x, w)
    if bias is not None:
        y = y + bias.to(dtype)[:, None]
    if lora is not None:
        xd = x if lora.dropout is None else lora.dropout(x)
        h = _RowsToChannelsFirst.apply(xd, lora.A.to(dtype))  # (batch, rank, L)
        y = torch.baddbmm(y, _broadcast(lora.B.to(dtype), x.shape[0]), h, alpha=lora.scale)
    return y


def channels_first_to_rows(y, weight, bias=None, lora: LowRankPath | None = None):
    """(batch, in, L) -> (batch, L, out), contiguous: the mixer's out_proj."""
    dtype = compute_dtype(y)
    y, w = y.to(dtype), weight.to(dtype)
    out = _ChannelsFirstToRows.apply(y, w)
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


def channels_first(x, weight):
    """(batch, in, L) -> (batch, out, L), W @ x per batch row: x_proj and dt_proj.

    Plain autograd gives both gradients contiguous here (W^T @ g and g @ x^T).
    """
    dtype = compute_dtype(x)
    x, w = x.to(dtype), weight.to(dtype)
    return torch.bmm(_broadcast(w, x.shape[0]), x)
