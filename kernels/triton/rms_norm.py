"""RMSNorm in Triton, forward and backward: transformers' `MambaRMSNorm`, one kernel each way.

Semantics are exactly `mamba_ft.ops.reference.rms_norm` (transformers' formula): statistics in
fp32, the normalised input cast back to the input's dtype, then scaled by the weight. The
eager version is five elementwise passes and a reduction forward and about twice that
backward over a (tokens, hidden) fp32 tensor per block; here each direction is one pass. The
backward keeps only the input and one fp32 rstd per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, H, eps,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mr = rows < n_rows
    mask = mr[:, None] & (cols < H)[None, :]
    offs = rows[:, None].to(tl.int64) * H + cols[None, :]
    x_in = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = x_in.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
    normed = (x * rstd[:, None]).to(x_in.dtype)  # transformers casts before the weight
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0)
    y = w[None, :] * normed
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=mr)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_ptr, n_rows, H,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                         ROWS_PER_PROGRAM: tl.constexpr):
    # y = w * xhat with xhat = x * rstd:  dxhat = dy * w,
    # dx = rstd * (dxhat - xhat * mean(dxhat * xhat)),  dw = sum_rows dy * xhat
    # (partials per program, summed by torch).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mc = cols < H
    w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM // BLOCK_R):
        rows = (pid * ROWS_PER_PROGRAM + i * BLOCK_R) + tl.arange(0, BLOCK_R)
        mr = rows < n_rows
        mask = mr[:, None] & mc[None, :]
        offs = rows[:, None].to(tl.int64) * H + cols[None, :]
        x_in = tl.load(x_ptr + offs, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mr, other=0.0)
        xhat = x_in.to(tl.float32) * rstd[:, None]
        # The forward rounded xhat to the input's dtype before the weight: w's gradient sees
        # that rounded value, x's gradient flows through it unchanged (straight-through, as
        # autograd does through a cast).
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dw += tl.sum(dy * xhat.to(x_in.dtype).to(tl.float32), axis=0)
        dxhat = dy * w[None, :]
        c = tl.sum(dxhat * xhat, axis=1) / H
        dx = rstd[:, None] * (dxhat - xhat * c[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * H + cols, dw, mask=mc)


def _block_rows(H: int) -> int:
    # About 4,096 elements per tile: whole rows, several per program for small hidden sizes.
    return max(1, min(16, 4096 // triton.next_power_of_2(H)))


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, H = x2.shape
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty((n_rows, H), device=x.device, dtype=out_dtype)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block_r = _block_rows(H)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
            x2, weight, y, rstd, n_rows, H, eps,
            BLOCK_R=block_r, BLOCK_H=triton.next_power_of_2(H))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, H = x2.shape
        dy = dy.reshape(n_rows, H).contiguous()
        dx = torch.empty_like(x2)
        block_r = _block_rows(H)
        # Enough programs to fill the GPU, each summing its rows' weight gradient.
        rows_per_program = block_r * max(1, triton.cdiv(n_rows, block_r * 1024))
        n_programs = triton.cdiv(n_rows, rows_per_program)
        dw = torch.empty((n_programs, H), device=x2.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(n_programs,)](
            x2, weight, rstd, dy, dx, dw, n_rows, H,
            BLOCK_R=block_r, BLOCK_H=triton.next_power_of_2(H), ROWS_PER_PROGRAM=rows_per_program)
        return dx.reshape(ctx.shape), dw.sum(0).to(weight.dtype), None


def rms_norm_fn(x, weight, eps):
    """Drop-in for `mamba_ft.ops.reference.rms_norm`."""
    return RMSNormFn.apply(x, weight, eps)
