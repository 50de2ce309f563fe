"""Selective scan (Mamba-1 S6) in Triton: chunked forward and backward, state in fp32.

Semantics are exactly `mamba_ft.reference.selective_scan` (mamba_ssm's layouts):
  u, delta, z: (batch, d, L)   A: (d, N) fp32   B, C: (batch, N, L)   D, delta_bias: (d,)
  initial_state / last state: (batch, d, N) fp32   reset: (batch, L) bool document starts.
Any strides are accepted; time-contiguous (batch, d, L) tensors load fastest, and that is the
layout the mixer produces.

Design (one program per (batch row, tile of BLOCK_D channels)):
- The program walks the sequence in chunks of BLOCK_T positions, and inside a chunk it walks
  the N states one after another. For one state n the chunk is a [BLOCK_D, BLOCK_T] tile:
  decay a = exp2(delta * A[:, n] * log2 e) (0 where a document starts) and drive
  x = delta * u * B[n], combined by one first-order `tl.associative_scan` along time. The
  output y = sum_n h_n * C[n] is accumulated in registers across the loop over n, so there is
  no reduction over the state axis at all (the cross-lane reduction over N was what limited
  the first version of this kernel, docs/kernels.md). delta, u, z and the output are loaded
  and stored once per chunk.
- The states cross chunk boundaries through a small global buffer, two slots of (d, N) per
  batch row, one block barrier per chunk: state n's value entering the chunk is read from one
  slot and folded in after the scan (h_t = prod(a) * h_in + scan(x)), and its value at the
  chunk's last position is written to the other by the lane holding it. (Keeping the states
  in a register tile instead costs two masked reductions per state and chunk; going through
  memory made the forward 27% faster.) With gradients, each state is also stored as it
  enters each chunk; that checkpoint (batch, n_chunks, d, N) is all the backward keeps
  besides the inputs: saved memory O(batch * d * N * L / BLOCK_T).
- The backward walks the chunks in reverse and, per state n, recomputes the chunk's states
  from its checkpoint, then runs the adjoint as a reverse scan dh_t = C_t dy_t + a_{t+1}
  dh_{t+1} (the shifted decay a_{t+1} comes from delta loaded at t+1, not from shifting
  registers) and uses a_t h_{t-1} = h_t - x_t, so no shifted state is needed either. There
  the per-state values go through small global buffers instead of register tiles: state n's
  checkpoint is read from the forward's, its adjoint carry between chunks lives in a 2-slot
  buffer (one block barrier per chunk), and its dA is written per chunk. dB and dC (sums
  over channels) are added with relaxed fp32 atomics; dA, dD and d(delta_bias) are written
  as partials and summed by torch (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Longest chunk (positions per tile). A sequence up to this length is one chunk; longer ones
# carry state between chunks. Tests lower it to exercise the carries on tiny shapes.
MAX_CHUNK = 512


@triton.jit
def _first_order(a_l, x_l, a_r, x_r):
    # Composition of h -> a_l h + x_l followed by h -> a_r h + x_r. For a reverse scan the
    # left operand is the part built from later positions, so the same function serves both.
    return a_l * a_r, a_r * x_l + x_r


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow: max(x, 0) + log(1 + e^-|x|), in exp2/log2 form.
    return tl.maximum(x, 0.0) + LN2 * tl.log2(1.0 + tl.exp2(-tl.abs(x) * LOG2E))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _load_tile(ptr, s_d, s_l, offs_d, offs_t, mask):
    """A [BLOCK_D, BLOCK_T] tile of a (d, L)-strided tensor, in fp32, 0 outside the mask."""
    return tl.load(ptr + offs_d[:, None] * s_d + offs_t[None, :] * s_l,
                   mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t, mask,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta for a [BLOCK_D, BLOCK_T] tile, with bias and softplus; 0 outside the mask.

    Also returns the pre-softplus value, which the backward needs for softplus' derivative.
    """
    raw = _load_tile(dt_ptr, s_dt_d, s_dt_l, offs_d, offs_t, mask)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _channel_vectors(bias_ptr, D_ptr, offs_d, md, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """delta_bias and D for the tile's channels (zeros when absent)."""
    bias = tl.zeros([offs_d.shape[0]], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0)
    Dv = tl.zeros([offs_d.shape[0]], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0)
    return bias, Dv


@triton.jit
def _decay(dt, A2, starts, HAS_RESET: tl.constexpr):
    """exp(delta * A) for one state's [BLOCK_D, BLOCK_T] tile; 0 where a document starts."""
    a = tl.exp2(dt * A2[:, None])
    if HAS_RESET:
        a = tl.where(starts, 0.0, a)
    return a


@triton.jit
def _column(tile, sel):
    """The column of a [BLOCK_D, K] register tile picked by `sel` ([1, K], one True), as a
    [BLOCK_D] vector: a masked sum, which keeps the tile's register layout."""
    return tl.sum(tl.where(sel, tile, 0.0), axis=1)


@triton.jit
def _program_rows(u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, io_ptr, bias_ptr, D_ptr, d,
                  s_u_b, s_dt_b, s_B_b, s_C_b, s_z_b, s_r_b, s_io_b,
                  BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """What both scan kernels start from: this program's batch row b, its channels and their
    mask, delta_bias and D for them, and the row's pointers (io is y forward, dout backward)."""
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < d
    bias, Dv = _channel_vectors(bias_ptr, D_ptr, offs_d, md, HAS_BIAS, HAS_D)
    return (b, offs_d, md, bias, Dv, u_ptr + b * s_u_b, dt_ptr + b * s_dt_b, B_ptr + b * s_B_b,
            C_ptr + b * s_C_b, z_ptr + b * s_z_b, reset_ptr + b * s_r_b, io_ptr + b * s_io_b)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, h0_ptr,
    y_ptr, ckpt_ptr, last_ptr, carry_ptr,
    d, L, N, n_chunks,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_y_b, s_y_d, s_y_l,
    s_r_b, s_r_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_CKPT: tl.constexpr, STORE_LAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, offs_d, md, bias, Dv, u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, y_ptr = _program_rows(
        u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, y_ptr, bias_ptr, D_ptr, d,
        s_u_b, s_dt_b, s_B_b, s_C_b, s_z_b, s_r_b, s_y_b, BLOCK_D, HAS_BIAS, HAS_D)
    # carry (batch, 2, d, N): the states between chunks, chunk c reading slot c % 2 and
    # writing the other. Going through memory, per state, spares the loop over states two
    # masked reductions (taking state n's column out of a register tile, and the chunk's last
    # position out of h), as in the backward.
    offs_n = tl.arange(0, BLOCK_N)
    mdn = md[:, None] & (offs_n < N)[None, :]
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    carry_ptr += b * 2 * d * N
    if HAS_H0:
        H = tl.load(h0_ptr + b * d * N + state_offs, mask=mdn, other=0.0)
    else:
        H = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    tl.store(carry_ptr + state_offs, H, mask=mdn)
    tl.debug_barrier()
    t_in_chunk = tl.arange(0, BLOCK_T)
    last_column = (t_in_chunk == BLOCK_T - 1)[None, :]
    for c in range(n_chunks):
        offs_t = c * BLOCK_T + t_in_chunk
        mt = offs_t < L
        mdt = md[:, None] & mt[None, :]
        u = _load_tile(u_ptr, s_u_d, s_u_l, offs_d, offs_t, mdt)
        dt, _ = _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t, mdt,
                            HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        starts = tl.zeros([1, BLOCK_T], dtype=tl.int1)
        if HAS_RESET:
            starts = (tl.load(reset_ptr + offs_t * s_r_l, mask=mt, other=0) != 0)[None, :]
        y = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        for n in range(N):
            A2 = tl.load(A_ptr + offs_d * N + n, mask=md, other=0.0) * LOG2E
            # B and C rows are loaded as full tiles (every channel row reads the same row):
            # that keeps them in the tile's register layout instead of converting a vector.
            Bn = _load_tile(B_ptr + n * s_B_n, 0, s_B_l, offs_d, offs_t, mdt)
            Cn = _load_tile(C_ptr + n * s_C_n, 0, s_C_l, offs_d, offs_t, mdt)
            aS, hS = tl.associative_scan((_decay(dt, A2, starts, HAS_RESET), dtu * Bn), axis=1,
                                         combine_fn=_first_order)
            h_in = tl.load(carry_ptr + (c % 2) * d * N + offs_d * N + n, mask=md, other=0.0)
            if STORE_CKPT:
                tl.store(ckpt_ptr + ((b * n_chunks + c) * d + offs_d) * N + n, h_in, mask=md)
            h = hS + aS * h_in[:, None]
            y += h * Cn
            # The state leaving the chunk, from the lane holding its last position. Past the
            # end of the sequence delta is 0 (a = 1, x = 0), so the last column holds the
            # state at position L - 1 even in a partial last chunk.
            out_ptrs = (carry_ptr + ((c + 1) % 2) * d * N + offs_d[:, None] * N + n
                        + 0 * t_in_chunk[None, :])
            tl.store(out_ptrs, h, mask=md[:, None] & last_column)
        # The next chunk reads the states just written, by other threads.
        tl.debug_barrier()
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = _load_tile(z_ptr, s_z_d, s_z_l, offs_d, offs_t, mdt)
            y = y * z * _sigmoid(z)
        tl.store(y_ptr + offs_d[:, None] * s_y_d + offs_t[None, :] * s_y_l,
                 y.to(y_ptr.dtype.element_ty), mask=mdt)
    if STORE_LAST:
        H = tl.load(carry_ptr + (n_chunks % 2) * d * N + state_offs, mask=mdn, other=0.0)
        tl.store(last_ptr + b * d * N + state_offs, H, mask=mdn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, ckpt_ptr,
    dout_ptr, carry_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
    d, L, N, n_chunks,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_o_b, s_o_d, s_o_l,
    s_r_b, s_r_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr, NEED_DH0: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # du, ddt, dz: contiguous (batch, d, L) in their inputs' dtypes (stored cast, so no
    # fp32 copy is written and cast again). dB, dC: zero-filled fp32 (batch, N, L).
    # dA (batch, n_chunks, d, N), dD and dbias (batch, d): partials summed by the caller.
    # carry (batch, 2, d, N): the adjoint state between chunks, slot 0 starting as the
    # gradient of the last state (or zeros); chunk i reads slot i % 2 and writes the other.
    # Reading a state's checkpoint, carry and writing its dA partial straight from global
    # memory, per state, keeps no [BLOCK_D, N] tile live through the loop over states (no
    # masked column extractions, no spills): 7.7% faster than register tiles.
    b, offs_d, md, bias, Dv, u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, dout_ptr = _program_rows(
        u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, dout_ptr, bias_ptr, D_ptr, d,
        s_u_b, s_dt_b, s_B_b, s_C_b, s_z_b, s_r_b, s_o_b, BLOCK_D, HAS_BIAS, HAS_D)
    dB_ptr += b * N * L
    dC_ptr += b * N * L
    grad_offs = b * d * L + offs_d[:, None] * L
    ckpt_ptr += b * n_chunks * d * N + offs_d * N
    carry_ptr += b * 2 * d * N + offs_d * N
    dA_ptr += b * n_chunks * d * N + offs_d * N
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    t_in_chunk = tl.arange(0, BLOCK_T)
    first_column = (t_in_chunk == 0)[None, :]
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        offs_t = c * BLOCK_T + t_in_chunk
        mt = offs_t < L
        mdt = md[:, None] & mt[None, :]
        # Only what the loop over states needs stays live through it (dt, dt1, dtu, dy and
        # three accumulators); u, z and dout are loaded again after it (cache hits) rather
        # than held in registers across it.
        dt, _ = _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t, mdt,
                            HAS_BIAS, SOFTPLUS)
        dtu = dt * _load_tile(u_ptr, s_u_d, s_u_l, offs_d, offs_t, mdt)
        dy = _load_tile(dout_ptr, s_o_d, s_o_l, offs_d, offs_t, mdt)
        if HAS_Z:
            z = _load_tile(z_ptr, s_z_d, s_z_l, offs_d, offs_t, mdt)
            dy = dy * z * _sigmoid(z)
        # delta one position later, for the adjoint's coefficient a_{t+1}. Past the end of
        # the sequence the coefficient is 1, so the gradient of the last state reaches
        # position L - 1 unchanged.
        offs_t1 = offs_t + 1
        mt1 = offs_t1 < L
        dt1, _ = _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t1,
                             md[:, None] & mt1[None, :], HAS_BIAS, SOFTPLUS)
        starts = tl.zeros([1, BLOCK_T], dtype=tl.int1)
        starts1 = tl.zeros([1, BLOCK_T], dtype=tl.int1)
        if HAS_RESET:
            starts = (tl.load(reset_ptr + offs_t * s_r_l, mask=mt, other=0) != 0)[None, :]
            starts1 = (tl.load(reset_ptr + offs_t1 * s_r_l, mask=mt1, other=0) != 0)[None, :]
        y_pre = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)  # sum_n h C, for dz
        dh_B = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)   # sum_n dh_n B_n
        dh_Aah = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)  # sum_n dh_n A_n a_n h_{n,t-1}
        for n in range(N):
            A = tl.load(A_ptr + offs_d * N + n, mask=md, other=0.0)
            A2 = A * LOG2E
            Bn = _load_tile(B_ptr + n * s_B_n, 0, s_B_l, offs_d, offs_t, mdt)
            Cn = _load_tile(C_ptr + n * s_C_n, 0, s_C_l, offs_d, offs_t, mdt)
            # Recompute this state's trajectory over the chunk from the checkpoint.
            x = dtu * Bn
            aS, hS = tl.associative_scan((_decay(dt, A2, starts, HAS_RESET), x), axis=1,
                                         combine_fn=_first_order)
            h = hS + aS * tl.load(ckpt_ptr + c * d * N + n, mask=md, other=0.0)[:, None]
            if HAS_Z:
                y_pre += h * Cn
            a1 = tl.where(mt1[None, :], _decay(dt1, A2, starts1, HAS_RESET), 1.0)
            gS, dhS = tl.associative_scan((a1, dy * Cn), axis=1, combine_fn=_first_order,
                                          reverse=True)
            dh = dhS + gS * tl.load(carry_ptr + (i % 2) * d * N + n, mask=md, other=0.0)[:, None]
            tl.store(carry_ptr + ((i + 1) % 2) * d * N + n, _column(dh, first_column), mask=md)
            # dB and dC sum over channels: one fp32 atomic per (channel, position), as
            # mamba_ssm does (a reduction over the channel tile first costs layout changes
            # through shared memory inside this loop, which measured slower).
            bc_ptrs = n * L + offs_t[None, :] + 0 * offs_d[:, None]
            tl.atomic_add(dC_ptr + bc_ptrs, dy * h, mask=mdt, sem="relaxed")
            tl.atomic_add(dB_ptr + bc_ptrs, dh * dtu, mask=mdt, sem="relaxed")
            dh_B += dh * Bn
            # a_t h_{t-1} = h_t - x_t (reset included), so no shifted state is needed.
            dh_ah = dh * (h - x)
            dh_Aah += dh_ah * A[:, None]
            tl.store(dA_ptr + c * d * N + n, tl.sum(dh_ah * dt, axis=1), mask=md)
        # The next (earlier) chunk reads the carries just written, possibly by other threads.
        tl.debug_barrier()
        u = _load_tile(u_ptr, s_u_d, s_u_l, offs_d, offs_t, mdt)
        du = dh_B * dt
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if HAS_Z:
            dout = _load_tile(dout_ptr, s_o_d, s_o_l, offs_d, offs_t, mdt)
            sz = _sigmoid(z)
            pre_gate = y_pre + Dv[:, None] * u
            dz = dout * pre_gate * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + grad_offs + offs_t[None, :], dz.to(dz_ptr.dtype.element_ty),
                     mask=mdt)
        ddt = dh_B * u + dh_Aah
        if SOFTPLUS:
            _, dt_pre = _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t, mdt,
                                    HAS_BIAS, SOFTPLUS)
            ddt = ddt * _sigmoid(dt_pre)
        ddt = tl.where(mdt, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + grad_offs + offs_t[None, :], du.to(du_ptr.dtype.element_ty), mask=mdt)
        tl.store(ddt_ptr + grad_offs + offs_t[None, :], ddt.to(ddt_ptr.dtype.element_ty),
                 mask=mdt)
    tl.store(dD_ptr + b * d + offs_d, dD_acc, mask=md)
    tl.store(dbias_ptr + b * d + offs_d, dbias_acc, mask=md)
    if NEED_DH0:
        # h_0 = a_0 h_init + x_0, so d h_init = a_0 dh_0 (a_0 is 0 where a document starts).
        offs_t0 = tl.arange(0, 1)
        dt0, _ = _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t0,
                             md[:, None] & (offs_t0 < L)[None, :], HAS_BIAS, SOFTPLUS)
        offs_n = tl.arange(0, BLOCK_N)
        mdn = md[:, None] & (offs_n < N)[None, :]
        A_tile = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mdn, other=0.0)
        a0 = tl.exp2(tl.sum(dt0, axis=1)[:, None] * A_tile * LOG2E)
        if HAS_RESET:
            r0 = tl.sum(tl.load(reset_ptr + offs_t0 * s_r_l).to(tl.int32), axis=0)
            a0 = tl.where(r0 != 0, 0.0, a0)
        dh_first = tl.load(carry_ptr[:, None] + (n_chunks % 2) * d * N + offs_n[None, :],
                           mask=mdn, other=0.0)
        tl.store(dh0_ptr + b * d * N + offs_d[:, None] * N + offs_n[None, :], a0 * dh_first,
                 mask=mdn)


def _tile_sizes(L: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for a sequence of length L.

    One channel per program and one warp: every reduction and layout change then stays
    inside a warp (no shared-memory round trips or block barriers in the loop over states).
    512 positions per chunk (16 per thread) was the fastest forward and forward+backward of
    the tile shapes timed on an H100 (docs/benchmarks.md).
    """
    block_t = min(MAX_CHUNK, max(16, triton.next_power_of_2(L)))
    return block_t, 1, 1


def _strides3(t: torch.Tensor | None):
    return (0, 0, 0) if t is None else tuple(t.stride())


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset,
                return_last_state):
        batch, d, L = u.shape
        N = A.shape[1]
        chunk, block_d, warps = _tile_sizes(L)
        n_chunks = triton.cdiv(L, chunk)
        A = A.float().contiguous()
        D = D.float().contiguous() if D is not None else None
        delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
        if initial_state is not None:
            initial_state = initial_state.float().contiguous()
        reset_u8 = reset.to(torch.uint8) if reset is not None else None
        needs_grad = any(ctx.needs_input_grad)
        y = torch.empty_like(u)
        ckpt = u.new_empty((batch, n_chunks, d, N), dtype=torch.float32) if needs_grad else None
        last = u.new_empty((batch, d, N), dtype=torch.float32) if return_last_state else None
        carry = u.new_empty((batch, 2, d, N), dtype=torch.float32)
        dummy = A
        _scan_fwd_kernel[(triton.cdiv(d, block_d), batch)](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            reset_u8 if reset_u8 is not None else dummy,
            initial_state if initial_state is not None else dummy,
            y, ckpt if ckpt is not None else dummy, last if last is not None else dummy, carry,
            d, L, N, n_chunks,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides3(z), *y.stride(),
            *(reset_u8.stride() if reset_u8 is not None else (0, 0)),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), HAS_RESET=reset is not None,
            HAS_H0=initial_state is not None, STORE_CKPT=needs_grad,
            STORE_LAST=bool(return_last_state),
            BLOCK_D=block_d, BLOCK_T=chunk, BLOCK_N=triton.next_power_of_2(N), num_warps=warps,
        )
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, reset_u8, ckpt)
            ctx.delta_softplus = bool(delta_softplus)
            ctx.has_h0 = initial_state is not None
            ctx.dtypes = (u.dtype, delta.dtype, B.dtype, C.dtype, z.dtype if z is not None else None)
        ctx.return_last_state = return_last_state
        return (y, last) if return_last_state else y

    @staticmethod
    def backward(ctx, dout, *rest):
        u, delta, A, B, C, D, z, delta_bias, reset_u8, ckpt = ctx.saved_tensors
        dlast = rest[0] if ctx.return_last_state and rest else None
        batch, d, L = u.shape
        N = A.shape[1]
        n_chunks = ckpt.shape[1]
        chunk, block_d, warps = _tile_sizes(L)
        f32 = dict(device=u.device, dtype=torch.float32)
        u_dt, dt_dt, B_dt, C_dt, z_dt = ctx.dtypes
        du = torch.empty((batch, d, L), device=u.device, dtype=u_dt)
        ddt = torch.empty((batch, d, L), device=u.device, dtype=dt_dt)
        dz = torch.empty((batch, d, L), device=u.device, dtype=z_dt) if z is not None else None
        dB = torch.zeros((batch, N, L), **f32)
        dC = torch.zeros((batch, N, L), **f32)
        dA = torch.empty((batch, n_chunks, d, N), **f32)
        dD = torch.empty((batch, d), **f32)
        dbias = torch.empty((batch, d), **f32)
        dh0 = torch.empty((batch, d, N), **f32) if ctx.has_h0 else None
        carry = torch.zeros((batch, 2, d, N), **f32)
        if dlast is not None:
            carry[:, 0] = dlast
        dummy = A
        _scan_bwd_kernel[(triton.cdiv(d, block_d), batch)](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            reset_u8 if reset_u8 is not None else dummy, ckpt,
            dout, carry,
            du, ddt, dA, dB, dC, dD, dz if dz is not None else dummy, dbias,
            dh0 if dh0 is not None else dummy,
            d, L, N, n_chunks,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides3(z),
            *dout.stride(), *(reset_u8.stride() if reset_u8 is not None else (0, 0)),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, HAS_RESET=reset_u8 is not None,
            NEED_DH0=ctx.has_h0,
            BLOCK_D=block_d, BLOCK_T=chunk, BLOCK_N=triton.next_power_of_2(N), num_warps=warps,
        )
        return (
            du, ddt, dA.sum((0, 1)), dB.to(B_dt), dC.to(C_dt),
            dD.sum(0) if D is not None else None,
            dz,
            dbias.sum(0) if delta_bias is not None else None,
            None, dh0, None, None,
        )


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      initial_state=None, reset=None, return_last_state=False):
    """Drop-in for `mamba_ft.reference.selective_scan` (and mamba_ssm's `selective_scan_fn`)."""
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 initial_state, reset, return_last_state)
