"""One-token decoding steps in Triton: the conv window and the recurrent state advance by one.

Semantics are exactly `mamba_ft.ops.reference.causal_conv1d_step`,
`mamba_ft.ops.reference.selective_state_step` and Mamba-2's
`mamba_ft.ops.ssd_reference.ssd_state_step` (nothing is updated in place; the new state comes
back as a new tensor). Decoding one token is a handful of tiny elementwise ops per layer, so
its cost is kernel launches: each step here is one launch where the reference issues about a
dozen. Forward only: `mamba_ft.ops` uses these when no gradient is needed (generation,
evaluation) and the differentiable reference otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The scan kernels' numerics (softplus without overflow, exp2-based sigmoid), shared.
from mamba_ft.kernels.selective_scan import LOG2E, _sigmoid, _softplus


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, new_state_ptr,
    d, s_x_b, s_x_d, s_st_b, s_st_d, s_st_k,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The window is [conv_state (WIDTH - 1 columns) | x]; y = sum(window * w) (+ bias, SiLU)
    # and the new state is the window without its first column.
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    md = offs_d < d
    in_state = offs_k[None, :] < WIDTH - 1
    window = tl.load(state_ptr + b * s_st_b + offs_d[:, None] * s_st_d + offs_k[None, :] * s_st_k,
                     mask=md[:, None] & in_state, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * s_x_b + offs_d * s_x_d, mask=md, other=0.0).to(tl.float32)
    window = tl.where(offs_k[None, :] == WIDTH - 1, x[:, None], window)
    w = tl.load(w_ptr + offs_d[:, None] * WIDTH + offs_k[None, :],
                mask=md[:, None] & (offs_k[None, :] < WIDTH), other=0.0).to(tl.float32)
    y = tl.sum(window * w, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    if SILU:
        y = y * _sigmoid(y)
    tl.store(y_ptr + b * d + offs_d, y.to(y_ptr.dtype.element_ty), mask=md)
    # new_state[:, k] = window[:, k + 1]: store column j of the window at k = j - 1.
    tl.store(new_state_ptr + (b * d + offs_d[:, None]) * (WIDTH - 1) + offs_k[None, :] - 1,
             window.to(new_state_ptr.dtype.element_ty),
             mask=md[:, None] & (offs_k[None, :] >= 1) & (offs_k[None, :] < WIDTH))


@triton.jit
def _state_step_kernel(
    state_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, new_state_ptr,
    d, N,
    s_h_b, s_h_d, s_h_n, s_u_b, s_u_d, s_dt_b, s_dt_d, s_B_b, s_B_n, s_C_b, s_C_n,
    s_z_b, s_z_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # new_state = exp(delta A) * state + delta u B;  y = new_state @ C (+ D u) (* silu(z)).
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < d
    mn = offs_n < N
    mdn = md[:, None] & mn[None, :]
    u = tl.load(u_ptr + b * s_u_b + offs_d * s_u_d, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_dt_b + offs_d * s_dt_d, mask=md, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mdn, other=0.0)
    Bv = tl.load(B_ptr + b * s_B_b + offs_n * s_B_n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_C_b + offs_n * s_C_n, mask=mn, other=0.0).to(tl.float32)
    h = tl.load(state_ptr + b * s_h_b + offs_d[:, None] * s_h_d + offs_n[None, :] * s_h_n,
                mask=mdn, other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A * LOG2E) * h + (dt * u)[:, None] * Bv[None, :]
    tl.store(new_state_ptr + (b * d + offs_d[:, None]) * N + offs_n[None, :], h, mask=mdn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += u * tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_z_b + offs_d * s_z_d, mask=md, other=0.0).to(tl.float32)
        y = y * z * _sigmoid(z)
    tl.store(y_ptr + b * d + offs_d, y.to(y_ptr.dtype.element_ty), mask=md)


@triton.jit
def _ssd_state_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, new_state_ptr,
    heads, heads_per_group, P, N, limit_lo, limit_hi,
    s_h_b, s_h_h, s_h_p, s_h_n, s_x_b, s_x_h, s_x_p, s_dt_b, s_dt_h, s_B_b, s_B_g, s_B_n,
    s_C_b, s_C_g, s_C_n, s_z_b, s_z_h, s_z_p, s_D_h, s_D_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Per (batch, head): one scalar decay exp(dt A) for the whole (head_dim, N) state;
    # new_state = decay * state + dt x B^T;  y = new_state C (+ D x) (* silu(z)).
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    g = h // heads_per_group
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp = offs_p < P
    mn = offs_n < N
    mpn = mp[:, None] & mn[None, :]
    dt = tl.load(dt_ptr + b * s_dt_b + h * s_dt_h).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, limit_lo), limit_hi)
    decay = tl.exp2(dt * tl.load(A_ptr + h).to(tl.float32) * LOG2E)
    x = tl.load(x_ptr + b * s_x_b + h * s_x_h + offs_p * s_x_p, mask=mp, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_B_b + g * s_B_g + offs_n * s_B_n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_C_b + g * s_C_g + offs_n * s_C_n, mask=mn, other=0.0).to(tl.float32)
    state = tl.load(state_ptr + b * s_h_b + h * s_h_h + offs_p[:, None] * s_h_p
                    + offs_n[None, :] * s_h_n, mask=mpn, other=0.0).to(tl.float32)
    state = decay * state + (dt * x)[:, None] * Bv[None, :]
    tl.store(new_state_ptr + ((b * heads + h) * P + offs_p[:, None]) * N + offs_n[None, :],
             state, mask=mpn)
    y = tl.sum(state * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + h * s_D_h + offs_p * s_D_p, mask=mp, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_z_b + h * s_z_h + offs_p * s_z_p, mask=mp,
                    other=0.0).to(tl.float32)
        y = y * z * _sigmoid(z)
    tl.store(y_ptr + (b * heads + h) * P + offs_p, y.to(y_ptr.dtype.element_ty), mask=mp)


_BLOCK_D = 64


def causal_conv1d_step(x, conv_state, weight, bias=None, activation="silu"):
    """Drop-in for `mamba_ft.ops.reference.causal_conv1d_step` (no gradient)."""
    if activation not in ("silu", None):
        raise ValueError(f"unsupported activation {activation!r}")
    batch, d = x.shape
    width = weight.shape[-1]
    y = torch.empty((batch, d), device=x.device, dtype=x.dtype)
    # The reference's window takes x's dtype, so its new state does too.
    new_state = torch.empty((batch, d, width - 1), device=x.device, dtype=x.dtype)
    weight = weight.reshape(d, width).contiguous()
    _conv_step_kernel[(triton.cdiv(d, _BLOCK_D), batch)](
        x, conv_state, weight, bias if bias is not None else weight, y, new_state,
        d, *x.stride(), *conv_state.stride(),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=activation == "silu",
        BLOCK_D=_BLOCK_D, BLOCK_K=triton.next_power_of_2(width),
    )
    return y, new_state


def _new_state_buffer(out, shape, device):
    """Where the kernel writes the new state: `out` itself when the kernel can (fp32,
    contiguous; a program reads its tile of the old state before writing it, so `out` may be
    the old state), else a fresh tensor copied into `out` afterwards."""
    if out is not None and out.dtype == torch.float32 and out.is_contiguous():
        return out
    return torch.empty(shape, device=device, dtype=torch.float32)


def _into(out, new_state):
    return new_state if out is None or out is new_state else out.copy_(new_state)


def selective_state_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, out=None):
    """Drop-in for `mamba_ft.ops.reference.selective_state_step` (no gradient)."""
    batch, d = u.shape
    N = A.shape[1]
    A = A.float().contiguous()
    y = torch.empty((batch, d), device=u.device, dtype=u.dtype)
    new_state = _new_state_buffer(out, (batch, d, N), u.device)
    dummy = A
    _state_step_kernel[(triton.cdiv(d, _BLOCK_D), batch)](
        state, u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, y, new_state,
        d, N, *state.stride(), *u.stride(), *delta.stride(), *B.stride(), *C.stride(),
        *(z.stride() if z is not None else (0, 0)),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), BLOCK_D=_BLOCK_D, BLOCK_N=triton.next_power_of_2(N),
    )
    return y, _into(out, new_state)


def ssd_state_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), out=None):
    """Drop-in for `mamba_ft.ops.ssd_reference.ssd_state_step` (no gradient)."""
    batch, heads, P = x.shape
    groups, N = B.shape[1], B.shape[2]
    A = A.float().contiguous()
    y = torch.empty((batch, heads, P), device=x.device, dtype=x.dtype)
    new_state = _new_state_buffer(out, (batch, heads, P, N), x.device)
    # D is (heads,) or (heads, head_dim): a head_dim stride of 0 reads the one value per head.
    D_strides = (0, 0) if D is None else (D.stride(0), D.stride(1) if D.dim() == 2 else 0)
    has_limit = tuple(dt_limit) != (0.0, float("inf"))
    dummy = A
    block_p = min(64, triton.next_power_of_2(P))
    _ssd_state_step_kernel[(triton.cdiv(P, block_p), batch * heads)](
        state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, y, new_state,
        heads, heads // groups, P, N, float(dt_limit[0]),
        min(float(dt_limit[1]), 3.0e38) if has_limit else 0.0,  # a finite stand-in for inf
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
        *(z.stride() if z is not None else (0, 0, 0)), *D_strides,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit, BLOCK_P=block_p,
        BLOCK_N=triton.next_power_of_2(N),
    )
    return y, _into(out, new_state)
