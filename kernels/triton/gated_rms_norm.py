"""Mamba-2's gated, grouped RMSNorm in Triton, forward and backward, one kernel each way.

Semantics are exactly `mamba_ft.modules.gated_rms_norm.gated_rms_norm` (transformers'
`MambaRMSNormGated`, and Falcon-H1's option to norm before the gate): per row of x (..., d) and
per group of `group_size` channels, in fp32,
  gate then norm (default):  h = x * silu(z),  y = w * (h * rstd(h)) cast to x's dtype first;
  norm then gate:            y = (w * x * rstd(x)) * silu(z), cast to x's dtype at the end;
and without a gate h = x. Eagerly this is some ten elementwise passes and a reduction over a
(tokens, d_inner) fp32 tensor per layer, and autograd keeps several of them for the backward;
here each direction is one pass, and the backward keeps x, z and one fp32 rstd per (row, group).

One program handles BLOCK_R rows of one group (a [BLOCK_R, BLOCK_G] tile: the group's channels
are contiguous in a row). The weight gradient is summed per program and then by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows per tile as for the plain RMSNorm: about 4,096 elements, here of one group's channels.
from mamba_ft.kernels.rms_norm import _block_rows


@triton.jit
def _silu_and_grad(z):
    sig = 1.0 / (1.0 + tl.exp(-z))
    return z * sig, sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _gated_norm_fwd_kernel(x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, D, G, eps,
                           HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    group = tl.program_id(1)
    n_groups = D // G
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = group * G + tl.arange(0, BLOCK_G)
    mr = rows < n_rows
    mc = tl.arange(0, BLOCK_G) < G
    mask = mr[:, None] & mc[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x_in = tl.load(x_ptr + offs, mask=mask, other=0.0)
    h = x_in.to(tl.float32)
    if HAS_GATE:
        s, _ = _silu_and_grad(tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        if not NORM_BEFORE_GATE:
            h = h * s
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / G + eps)
    w = tl.load(w_ptr + cols, mask=mc, other=0.0)
    xhat = h * rstd[:, None]
    if NORM_BEFORE_GATE:
        y = w.to(tl.float32)[None, :] * xhat
        if HAS_GATE:
            y = y * s
    else:
        # transformers casts the normalised value to the input's dtype before the weight.
        y = w[None, :] * xhat.to(x_in.dtype)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * n_groups + group, rstd, mask=mr)


@triton.jit
def _gated_norm_bwd_kernel(x_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dz_ptr, dw_ptr,
                           n_rows, D, G, HAS_GATE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
                           ROWS_PER_PROGRAM: tl.constexpr):
    # With xhat = h * rstd and a = upstream gradient of xhat:
    #   dh = rstd * (a - xhat * mean(a * xhat))  (over the group),
    # gate then norm: a = dy * w, h = x * s:  dx = dh * s, dz = dh * x * silu'(z),
    #                 dw = sum dy * xhat (rounded as the forward rounded it);
    # norm then gate: a = dy * s * w, h = x:  dx = dh, dz = dy * w * xhat * silu'(z),
    #                 dw = sum dy * s * xhat.
    pid = tl.program_id(0)
    group = tl.program_id(1)
    n_groups = D // G
    cols = group * G + tl.arange(0, BLOCK_G)
    mc = tl.arange(0, BLOCK_G) < G
    w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_G], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM // BLOCK_R):
        rows = (pid * ROWS_PER_PROGRAM + i * BLOCK_R) + tl.arange(0, BLOCK_R)
        mr = rows < n_rows
        mask = mr[:, None] & mc[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x_in = tl.load(x_ptr + offs, mask=mask, other=0.0)
        x = x_in.to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows * n_groups + group, mask=mr, other=0.0)
        if HAS_GATE:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            s, ds = _silu_and_grad(z)
        else:
            s = tl.full(x.shape, 1.0, tl.float32)
            ds = tl.zeros(x.shape, tl.float32)
        if NORM_BEFORE_GATE:
            xhat = x * rstd[:, None]
            a = dy * s * w[None, :]
            dw += tl.sum(dy * s * xhat, axis=0)
        else:
            xhat = x * s * rstd[:, None]
            a = dy * w[None, :]
            dw += tl.sum(dy * xhat.to(x_in.dtype).to(tl.float32), axis=0)
        dh = rstd[:, None] * (a - xhat * (tl.sum(a * xhat, axis=1) / G)[:, None])
        if NORM_BEFORE_GATE:
            dx = dh
            dz = dy * w[None, :] * xhat * ds
        else:
            dx = dh * s
            dz = dh * x * ds
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_GATE:
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * D + cols, dw, mask=mc)


class GatedRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size, norm_before_gate):
        shape = x.shape
        D = shape[-1]
        if D % group_size:
            raise ValueError(f"gated_rms_norm: group_size {group_size} does not divide {D}")
        x2 = x.reshape(-1, D).contiguous()
        z2 = None if z is None else z.reshape(-1, D).contiguous()
        n_rows = x2.shape[0]
        out_dtype = x.dtype if norm_before_gate else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty((n_rows, D), device=x.device, dtype=out_dtype)
        n_groups = D // group_size
        rstd = torch.empty((n_rows, n_groups), device=x.device, dtype=torch.float32)
        block_r = _block_rows(group_size)
        _gated_norm_fwd_kernel[(triton.cdiv(n_rows, block_r), n_groups)](
            x2, x2 if z2 is None else z2, weight, y, rstd, n_rows, D, group_size, eps,
            HAS_GATE=z2 is not None, NORM_BEFORE_GATE=norm_before_gate,
            BLOCK_R=block_r, BLOCK_G=triton.next_power_of_2(group_size))
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.shape, ctx.group_size, ctx.norm_before_gate = shape, group_size, norm_before_gate
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, rstd = ctx.saved_tensors
        n_rows, D = x2.shape
        G = ctx.group_size
        dy = dy.reshape(n_rows, D).contiguous()
        dx = torch.empty_like(x2)
        dz = None if z2 is None else torch.empty_like(z2)
        block_r = _block_rows(G)
        rows_per_program = block_r * max(1, triton.cdiv(n_rows, block_r * 256))
        n_programs = triton.cdiv(n_rows, rows_per_program)
        dw = torch.empty((n_programs, D), device=x2.device, dtype=torch.float32)
        _gated_norm_bwd_kernel[(n_programs, D // G)](
            x2, x2 if z2 is None else z2, weight, rstd, dy, dx, dx if dz is None else dz, dw,
            n_rows, D, G, HAS_GATE=z2 is not None, NORM_BEFORE_GATE=ctx.norm_before_gate,
            BLOCK_R=block_r, BLOCK_G=triton.next_power_of_2(G),
            ROWS_PER_PROGRAM=rows_per_program)
        dz = None if dz is None else dz.reshape(ctx.shape)
        return dx.reshape(ctx.shape), dz, dw.sum(0).to(weight.dtype), None, None, None


def gated_rms_norm_fn(x, z, weight, eps, group_size, norm_before_gate=False):
    """Drop-in for `mamba_ft.modules.gated_rms_norm.gated_rms_norm`."""
    return GatedRMSNormFn.apply(x, z, weight, eps, group_size, norm_before_gate)
