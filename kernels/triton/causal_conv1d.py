"""Causal depthwise conv1d in Triton, forward and backward (widths up to 4), fp32 arithmetic.

Semantics are exactly `mamba_ft.ops.reference.causal_conv1d`: x (batch, d, L), weight (d, width),
optional bias (d,), initial_state (batch, d, width - 1) holding the inputs before position 0,
reset (batch, L) bool document starts (tap k of position t is used only if no document starts
in (t - k, t]), optional SiLU.

One program per (batch, tile of BLOCK_D channels, tile of BLOCK_L positions). The backward
recomputes the pre-activation at t + k for each tap k instead of storing it: the input tile
is loaded at the seven shifts t - 3 .. t + 3 once (cache hits after the first) and shared by
the four taps, which are written once, for width 4, with zero weights past the real width.
It writes dweight / dbias partials per program, summed on the host side: deterministic, no
atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tap_input(x_ptr, h0_ptr, s_x_d, s_x_l, offs_d, md, src, L, WIDTH: tl.constexpr,
               HAS_H0: tl.constexpr):
    """x at positions `src` (may be negative: then the initial state), 0 where absent."""
    mx = md[:, None] & (src >= 0)[None, :] & (src < L)[None, :]
    v = tl.load(x_ptr + offs_d[:, None] * s_x_d + src[None, :] * s_x_l, mask=mx,
                other=0.0).to(tl.float32)
    if HAS_H0:
        mh = md[:, None] & (src < 0)[None, :] & (src >= 1 - WIDTH)[None, :]
        hv = tl.load(h0_ptr + offs_d[:, None] * (WIDTH - 1) + (WIDTH - 1 + src)[None, :],
                     mask=mh, other=0.0).to(tl.float32)
        v = tl.where(mh, hv, v)
    return v


@triton.jit
def _no_start(reset_ptr, s_r_l, pos, L):
    """1 where no document starts at `pos` (positions outside [0, L) never start one)."""
    m = (pos >= 0) & (pos < L)
    r = tl.load(reset_ptr + pos * s_r_l, mask=m, other=0)
    return r == 0


@triton.jit
def _pre_activation(x_ptr, w_ptr, bias, h0_ptr, reset_ptr, s_x_d, s_x_l, s_r_l,
                    offs_d, md, offs_t, L,
                    WIDTH: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr):
    acc = tl.zeros([offs_d.shape[0], offs_t.shape[0]], dtype=tl.float32) + bias[:, None]
    valid = offs_t >= -WIDTH  # all true
    for k in tl.static_range(WIDTH):
        if HAS_RESET:
            if k > 0:
                valid = valid & _no_start(reset_ptr, s_r_l, offs_t - k + 1, L)
        w = tl.load(w_ptr + offs_d * WIDTH + (WIDTH - 1 - k), mask=md, other=0.0).to(tl.float32)
        v = _tap_input(x_ptr, h0_ptr, s_x_d, s_x_l, offs_d, md, offs_t - k, L,
                       WIDTH, HAS_H0)
        acc += tl.where(valid[None, :], v * w[:, None], 0.0)
    return acc


@triton.jit
def _tile(pid_d, pid_l, bias_ptr, d, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
          HAS_BIAS: tl.constexpr):
    """A program's channel and position offsets, channel mask and bias (0 when absent)."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    md = offs_d < d
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    return offs_d, offs_t, md, bias


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, h0_ptr, reset_ptr, y_ptr,
    d, L,
    s_x_b, s_x_d, s_x_l, s_y_b, s_y_d, s_y_l, s_r_b, s_r_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_RESET: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d, offs_t, md, bias = _tile(pid_d, pid_l, bias_ptr, d, BLOCK_D, BLOCK_L, HAS_BIAS)
    pre = _pre_activation(x_ptr + b * s_x_b, w_ptr, bias, h0_ptr + b * d * (WIDTH - 1),
                          reset_ptr + b * s_r_b, s_x_d, s_x_l, s_r_l, offs_d, md, offs_t, L,
                          WIDTH, HAS_H0, HAS_RESET)
    y = pre
    if SILU:
        y = pre / (1.0 + tl.exp2(-pre * LOG2E))
    m = md[:, None] & (offs_t < L)[None, :]
    tl.store(y_ptr + b * s_y_b + offs_d[:, None] * s_y_d + offs_t[None, :] * s_y_l,
             y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _tap_weight(w_ptr, offs_d, md, k: tl.constexpr, WIDTH: tl.constexpr):
    """The weight of tap k (applied to the input k positions back); 0 for k >= WIDTH, so the
    backward below is written once, for width 4."""
    if k < WIDTH:
        return tl.load(w_ptr + offs_d * WIDTH + (WIDTH - 1 - k), mask=md, other=0.0).to(tl.float32)
    return tl.zeros([offs_d.shape[0]], dtype=tl.float32)


@triton.jit
def _taps_valid(reset_ptr, s_r_l, s, L, HAS_RESET: tl.constexpr):
    """For positions s: whether taps 1, 2 and 3 are used (no document starts in (s - k, s]),
    as 0/1 factors [1, len(s)]."""
    if HAS_RESET:
        v1 = _no_start(reset_ptr, s_r_l, s, L).to(tl.float32)[None, :]
        v2 = v1 * _no_start(reset_ptr, s_r_l, s - 1, L).to(tl.float32)[None, :]
        v3 = v2 * _no_start(reset_ptr, s_r_l, s - 2, L).to(tl.float32)[None, :]
        return v1, v2, v3
    one = tl.full([1, s.shape[0]], 1.0, dtype=tl.float32)
    return one, one, one


@triton.jit
def _dpre_at(dy_ptr, s_o_d, s_o_l, offs_d, md, s, L, x0, x1, x2, x3, w0, w1, w2, w3,
             v1, v2, v3, bias, SILU: tl.constexpr):
    """Gradient at the pre-activation of positions s (0 outside [0, L)), from the inputs at
    s, s - 1, s - 2, s - 3 (x0..x3) and the taps' validity there."""
    m = md[:, None] & (s >= 0)[None, :] & (s < L)[None, :]
    g = tl.load(dy_ptr + offs_d[:, None] * s_o_d + s[None, :] * s_o_l, mask=m,
                other=0.0).to(tl.float32)
    if SILU:
        pre = (bias[:, None] + w0[:, None] * x0 + v1 * (w1[:, None] * x1)
               + v2 * (w2[:, None] * x2) + v3 * (w3[:, None] * x3))
        sig = 1.0 / (1.0 + tl.exp2(-pre * LOG2E))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _local_grads(x_ptr, w_ptr, bias, h0_ptr, reset_ptr, dy_ptr, s_x_d, s_x_l, s_r_l, s_o_d,
                 s_o_l, offs_d, md, p, L, WIDTH: tl.constexpr, HAS_H0: tl.constexpr,
                 HAS_RESET: tl.constexpr, SILU: tl.constexpr):
    """d(input) at positions p, and what the weight gradient needs there.

    Input p feeds tap k of output p + k, so d(input)_p = sum_k valid_k(p + k) w_k dpre_{p+k}.
    The four dpre tiles need the inputs at p - 3 .. p + 3: seven shifted loads (cache hits
    after the first), each used by every tap that reads it. Returns dx, dpre at p and the
    inputs at p, p - 1, p - 2, p - 3 with the taps' validity at p.
    """
    w0 = _tap_weight(w_ptr, offs_d, md, 0, WIDTH)
    w1 = _tap_weight(w_ptr, offs_d, md, 1, WIDTH)
    w2 = _tap_weight(w_ptr, offs_d, md, 2, WIDTH)
    w3 = _tap_weight(w_ptr, offs_d, md, 3, WIDTH)
    xm3 = _tap_input(x_ptr, h0_ptr, s_x_d, s_x_l, offs_d, md, p - 3, L, WIDTH, HAS_H0)
    xm2 = _tap_input(x_ptr, h0_ptr, s_x_d, s_x_l, offs_d, md, p - 2, L, WIDTH, HAS_H0)
    xm1 = _tap_input(x_ptr, h0_ptr, s_x_d, s_x_l, offs_d, md, p - 1, L, WIDTH, HAS_H0)
    x0 = _tap_input(x_ptr, h0_ptr, s_x_d, s_x_l, offs_d, md, p, L, WIDTH, HAS_H0)
    xp1 = _tap_input(x_ptr, h0_ptr, s_x_d, s_x_l, offs_d, md, p + 1, L, WIDTH, HAS_H0)
    xp2 = _tap_input(x_ptr, h0_ptr, s_x_d, s_x_l, offs_d, md, p + 2, L, WIDTH, HAS_H0)
    xp3 = _tap_input(x_ptr, h0_ptr, s_x_d, s_x_l, offs_d, md, p + 3, L, WIDTH, HAS_H0)
    a1, a2, a3 = _taps_valid(reset_ptr, s_r_l, p, L, HAS_RESET)
    b1, b2, b3 = _taps_valid(reset_ptr, s_r_l, p + 1, L, HAS_RESET)
    c1, c2, c3 = _taps_valid(reset_ptr, s_r_l, p + 2, L, HAS_RESET)
    e1, e2, e3 = _taps_valid(reset_ptr, s_r_l, p + 3, L, HAS_RESET)
    g0 = _dpre_at(dy_ptr, s_o_d, s_o_l, offs_d, md, p, L, x0, xm1, xm2, xm3,
                  w0, w1, w2, w3, a1, a2, a3, bias, SILU)
    g1 = _dpre_at(dy_ptr, s_o_d, s_o_l, offs_d, md, p + 1, L, xp1, x0, xm1, xm2,
                  w0, w1, w2, w3, b1, b2, b3, bias, SILU)
    g2 = _dpre_at(dy_ptr, s_o_d, s_o_l, offs_d, md, p + 2, L, xp2, xp1, x0, xm1,
                  w0, w1, w2, w3, c1, c2, c3, bias, SILU)
    g3 = _dpre_at(dy_ptr, s_o_d, s_o_l, offs_d, md, p + 3, L, xp3, xp2, xp1, x0,
                  w0, w1, w2, w3, e1, e2, e3, bias, SILU)
    dx = (w0[:, None] * g0 + b1 * (w1[:, None] * g1) + c2 * (w2[:, None] * g2)
          + e3 * (w3[:, None] * g3))
    return dx, g0, x0, xm1 * a1, xm2 * a2, xm3 * a3


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, h0_ptr, reset_ptr, dy_ptr,
    dx_ptr, dw_ptr, dbias_ptr, dh0_ptr,
    d, L, n_ltiles,
    s_x_b, s_x_d, s_x_l, s_o_b, s_o_d, s_o_l, s_dx_b, s_dx_d, s_dx_l, s_r_b, s_r_l,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_RESET: tl.constexpr, SILU: tl.constexpr, NEED_DH0: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # dx (batch, d, L) in x's dtype and layout; dw (batch, n_ltiles, d, WIDTH) and dbias
    # (batch, n_ltiles, d) partials; dh0 (batch, d, WIDTH - 1).
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d, offs_t, md, bias = _tile(pid_d, pid_l, bias_ptr, d, BLOCK_D, BLOCK_L, HAS_BIAS)
    mt = offs_t < L
    x_ptr += b * s_x_b
    dy_ptr += b * s_o_b
    reset_ptr += b * s_r_b
    h0_ptr += b * d * (WIDTH - 1)
    dx, g, x0, x1, x2, x3 = _local_grads(x_ptr, w_ptr, bias, h0_ptr, reset_ptr, dy_ptr, s_x_d,
                                         s_x_l, s_r_l, s_o_d, s_o_l, offs_d, md, offs_t, L,
                                         WIDTH, HAS_H0, HAS_RESET, SILU)
    tl.store(dx_ptr + b * s_dx_b + offs_d[:, None] * s_dx_d + offs_t[None, :] * s_dx_l,
             dx.to(dx_ptr.dtype.element_ty), mask=md[:, None] & mt[None, :])
    # Weight and bias gradients of this tile: tap k pairs dpre at t with the (used) input at
    # t - k; g is 0 past the end of the sequence.
    part = (b * n_ltiles + pid_l) * d + offs_d
    tl.store(dbias_ptr + part, tl.sum(g, axis=1), mask=md)
    tl.store(dw_ptr + part * WIDTH + (WIDTH - 1), tl.sum(g * x0, axis=1), mask=md)
    if WIDTH > 1:
        tl.store(dw_ptr + part * WIDTH + (WIDTH - 2), tl.sum(g * x1, axis=1), mask=md)
    if WIDTH > 2:
        tl.store(dw_ptr + part * WIDTH + (WIDTH - 3), tl.sum(g * x2, axis=1), mask=md)
    if WIDTH > 3:
        tl.store(dw_ptr + part * WIDTH + (WIDTH - 4), tl.sum(g * x3, axis=1), mask=md)
    if NEED_DH0:
        if pid_l == 0:
            # The initial state holds the inputs at positions -(WIDTH - 1) .. -1.
            offs_p = tl.arange(0, 4) - (WIDTH - 1)
            dh0, _, _, _, _, _ = _local_grads(x_ptr, w_ptr, bias, h0_ptr, reset_ptr, dy_ptr,
                                              s_x_d, s_x_l, s_r_l, s_o_d, s_o_l, offs_d, md,
                                              offs_p, L, WIDTH, HAS_H0, HAS_RESET, SILU)
            mp = md[:, None] & (offs_p < 0)[None, :]
            tl.store(dh0_ptr + b * d * (WIDTH - 1) + offs_d[:, None] * (WIDTH - 1)
                     + (offs_p + WIDTH - 1)[None, :], dh0, mask=mp)


# (channels, positions) per program, for inputs contiguous along time (Mamba's channels-first
# rows). The backward holds eleven shifted tiles: smaller ones keep more programs resident
# (H100, Mamba-1.4B shape (2, 4096, 2048): 8 x 128 took 0.104 ms, 16 x 128 0.165 ms, the best
# and the former of the 18 shapes timed, docs/benchmarks.md).
_TILES_TIME_CONTIGUOUS = dict(fwd=(16, 128), bwd=(8, 128))
# The same numbers of elements for inputs contiguous along channels (Mamba-2's rows, read
# through a transposed view): wide in channels, so each position's load is one run of bytes.
_TILES_CHANNELS_CONTIGUOUS = dict(fwd=(64, 32), bwd=(32, 32))


def _channels_contiguous(x: torch.Tensor) -> bool:
    return x.stride(1) == 1 and x.shape[2] > 1


def _tiles(x: torch.Tensor, direction: str) -> tuple[int, int]:
    tiles = _TILES_CHANNELS_CONTIGUOUS if _channels_contiguous(x) else _TILES_TIME_CONTIGUOUS
    return tiles[direction]


def _empty_in_layout_of(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised (batch, d, L) tensor laid out as x is: contiguous along channels (a
    transposed (batch, L, d) tensor) when x is, so the conv's output and input gradient stay in
    the rows' layout and nothing is transposed in memory; else contiguous."""
    batch, d, L = x.shape
    if _channels_contiguous(x):
        return torch.empty((batch, L, d), device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty((batch, d, L), device=x.device, dtype=x.dtype)


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, reset, silu):
        batch, d, L = x.shape
        width = weight.shape[1]
        weight = weight.contiguous()
        if initial_state is not None:
            initial_state = initial_state.contiguous()
        reset_u8 = reset.to(torch.uint8) if reset is not None else None
        y = _empty_in_layout_of(x)
        block_d, block_l = _tiles(x, "fwd")
        grid = (triton.cdiv(L, block_l), triton.cdiv(d, block_d), batch)
        _conv_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight,
            initial_state if initial_state is not None else weight,
            reset_u8 if reset_u8 is not None else weight, y,
            d, L, *x.stride(), *y.stride(),
            *(reset_u8.stride() if reset_u8 is not None else (0, 0)),
            WIDTH=width, HAS_BIAS=bias is not None, HAS_H0=initial_state is not None,
            HAS_RESET=reset is not None, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l,
        )
        ctx.save_for_backward(x, weight, bias, initial_state, reset_u8)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, initial_state, reset_u8 = ctx.saved_tensors
        batch, d, L = x.shape
        width = weight.shape[1]
        block_d, block_l = _tiles(x, "bwd")
        n_ltiles = triton.cdiv(L, block_l)
        f32 = dict(device=x.device, dtype=torch.float32)
        dx = _empty_in_layout_of(x)  # stored cast
        dw = torch.empty((batch, n_ltiles, d, width), **f32)
        dbias = torch.empty((batch, n_ltiles, d), **f32)
        need_dh0 = initial_state is not None and ctx.needs_input_grad[3]
        dh0 = torch.zeros((batch, d, width - 1), **f32) if need_dh0 else None
        grid = (n_ltiles, triton.cdiv(d, block_d), batch)
        _conv_bwd_kernel[grid](
            x, weight, bias if bias is not None else weight,
            initial_state if initial_state is not None else weight,
            reset_u8 if reset_u8 is not None else weight, dy,
            dx, dw, dbias, dh0 if dh0 is not None else dw,
            d, L, n_ltiles, *x.stride(), *dy.stride(), *dx.stride(),
            *(reset_u8.stride() if reset_u8 is not None else (0, 0)),
            WIDTH=width, HAS_BIAS=bias is not None, HAS_H0=initial_state is not None,
            HAS_RESET=reset_u8 is not None, SILU=ctx.silu, NEED_DH0=need_dh0,
            BLOCK_D=block_d, BLOCK_L=block_l,
        )
        return (
            dx,
            dw.sum((0, 1)).to(weight.dtype),
            dbias.sum((0, 1)).to(bias.dtype) if bias is not None else None,
            dh0.to(initial_state.dtype) if dh0 is not None else None,
            None, None,
        )


def causal_conv1d_fn(x, weight, bias=None, initial_state=None, reset=None, activation="silu",
                     return_final_state=False):
    """Drop-in for `mamba_ft.ops.reference.causal_conv1d` (fused Triton forward and backward)."""
    if activation not in ("silu", None):
        raise ValueError(f"unsupported activation {activation!r}")
    width = weight.shape[-1]
    if not 1 <= width <= 4:
        raise ValueError(f"causal_conv1d kernel supports widths 1 to 4, got {width}")
    if initial_state is not None:
        initial_state = initial_state.to(x.dtype)
    y = CausalConv1dFn.apply(x, weight, bias, initial_state, reset, activation == "silu")
    if not return_final_state:
        return y
    # The next conv state is the last width - 1 inputs (taken from the initial state when the
    # sequence is shorter); plain torch ops, so its gradient flows through autograd.
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[1], width - 1)
    if width == 1:
        return y, x[..., :0]
    return y, torch.cat([initial_state, x[..., -(width - 1):]], dim=-1)[..., -(width - 1):]
