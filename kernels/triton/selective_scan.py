"""Selective scan (Mamba-1 S6) in Triton: chunked forward and backward, state in fp32.

Semantics are exactly `mamba_ft.ops.reference.selective_scan` (mamba_ssm's layouts):
  u, delta, z: (batch, d, L)   A: (d, N) fp32   B, C: (batch, N, L)   D, delta_bias: (d,)
  initial_state / last state: (batch, d, N) fp32   reset: (batch, L) bool document starts.
Any strides are accepted; time-contiguous (batch, d, L) tensors load fastest, and that is the
layout the mixer produces.

Design (one program per (batch row, channel), one warp; the launch sets BLOCK_D = 1):
- The program walks the sequence in chunks of BLOCK_T positions, and inside a chunk it walks
  the N states one after another. For one state n the chunk is a [1, BLOCK_T] tile:
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
  enters each of the backward's chunks; that checkpoint (batch, n_chunks, d, N) is all the
  backward keeps besides the inputs: saved memory O(batch * d * N * L / BLOCK_T).
- The backward walks the chunks (or their halves, BWD_SPLIT) in reverse and, per state n,
  recomputes the chunk's states from its checkpoint, then runs the adjoint as a reverse scan
  dh_t = C_t dy_t + a_{t+1} dh_{t+1} (the shifted decay a_{t+1} comes from delta loaded at
  t+1, not from shifting registers) and uses a_t h_{t-1} = h_t - x_t, so no shifted state is
  needed either. Its tile is [ROWS, K]: position row * K + col, K being the loads' 16-byte
  vector width, so every thread holds whole rows. Both scans then run within rows in
  registers, and only one value per row crosses lanes (`_scan_rows`); the reverse scan flips
  rows within threads instead of using `reverse=True`, which Triton lowers with a
  lane-reversing shuffle of every element (docs/kernels.md has the instruction counts that
  led here). The kernel is latency-bound, not issue-bound, so each state's inputs (B, C, A, checkpoint,
  carry) are loaded one iteration ahead. The per-state values go through small global
  buffers instead of register tiles: state n's checkpoint is read from the forward's, its
  adjoint carry between chunks lives in a 2-slot buffer (one block barrier per chunk), and
  its dA is written per chunk. dB and dC (sums over channels) are added with relaxed fp32
  atomics; dA, dD and d(delta_bias) are written as partials and summed by torch
  (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamba_ft.kernels.scan_layout import normalize_scan_inputs

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Tuned on an H100 (`benchmarks/kernel_speed.py --sweep`, docs/benchmarks.md):
# Longest forward chunk (positions per tile). A sequence up to this length is one chunk;
# longer ones carry state between chunks. Tests lower it to exercise the carries.
MAX_CHUNK = 512
# The backward walks chunks of MAX_CHUNK // BWD_SPLIT positions (1 or 2: with 2 the forward
# also checkpoints the state after each chunk's middle position).
BWD_SPLIT = 1
# Register cap of the backward kernel (None: the compiler's choice).
BWD_MAXNREG = None


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
def _load_tile(ptr, offs, mask):
    """A tile at element offsets `offs` (already scaled by the strides), in fp32, 0 outside
    the mask."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_delta(dt_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta at offsets `offs`, with bias (broadcast to the tile) and softplus, 0 outside the
    mask; and its pre-softplus value, which the backward needs for softplus' derivative."""
    raw = _load_tile(dt_ptr, offs, mask)
    if HAS_BIAS:
        raw = raw + bias
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
def _program_rows(u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, io_ptr, bias_ptr, D_ptr, d,
                  s_u_b, s_dt_b, s_B_b, s_C_b, s_z_b, s_r_b, s_io_b,
                  BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """What the forward kernel starts from: this program's batch row b, its channels and their
    mask, delta_bias and D for them, and the row's pointers (io is the output y)."""
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
    STORE_CKPT: tl.constexpr, STORE_LAST: tl.constexpr, SPLIT: tl.constexpr,
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
    mid_column = (t_in_chunk == BLOCK_T // 2 - 1)[None, :]
    for c in range(n_chunks):
        offs_t = c * BLOCK_T + t_in_chunk
        mt = offs_t < L
        mdt = md[:, None] & mt[None, :]
        u = _load_tile(u_ptr + offs_d[:, None] * s_u_d, offs_t[None, :] * s_u_l, mdt)
        dt, _ = _load_delta(dt_ptr + offs_d[:, None] * s_dt_d, offs_t[None, :] * s_dt_l, mdt,
                            bias[:, None], HAS_BIAS, SOFTPLUS)
        dtu = dt * u
        starts = tl.zeros([1, BLOCK_T], dtype=tl.int1)
        if HAS_RESET:
            starts = (tl.load(reset_ptr + offs_t * s_r_l, mask=mt, other=0) != 0)[None, :]
        y = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
        # B and C rows are loaded as full tiles (every channel row reads the same row): that
        # keeps them in the tile's register layout instead of converting a vector. Each
        # state's inputs are loaded one iteration ahead, as in the backward.
        bc_offs = 0 * offs_d[:, None] + offs_t[None, :]
        B_next = tl.load(B_ptr + bc_offs * s_B_l, mask=mdt, other=0.0)
        C_next = tl.load(C_ptr + bc_offs * s_C_l, mask=mdt, other=0.0)
        A_next = tl.load(A_ptr + offs_d * N, mask=md, other=0.0)
        h_in_next = tl.load(carry_ptr + (c % 2) * d * N + offs_d * N, mask=md, other=0.0)
        for n in range(N):
            A2 = A_next * LOG2E
            Bn = B_next.to(tl.float32)
            Cn = C_next.to(tl.float32)
            h_in = h_in_next
            nxt = tl.minimum(n + 1, N - 1)  # the last state loads itself again
            B_next = tl.load(B_ptr + nxt * s_B_n + bc_offs * s_B_l, mask=mdt, other=0.0)
            C_next = tl.load(C_ptr + nxt * s_C_n + bc_offs * s_C_l, mask=mdt, other=0.0)
            A_next = tl.load(A_ptr + offs_d * N + nxt, mask=md, other=0.0)
            h_in_next = tl.load(carry_ptr + (c % 2) * d * N + offs_d * N + nxt, mask=md,
                                other=0.0)
            aS, hS = tl.associative_scan((_decay(dt, A2, starts, HAS_RESET), dtu * Bn), axis=1,
                                         combine_fn=_first_order)
            h = hS + aS * h_in[:, None]
            if STORE_CKPT:
                # One checkpoint per backward chunk: the state entering the chunk and, when
                # the backward walks half chunks, after its middle position too (from the
                # lane holding it).
                ckpt_at = ckpt_ptr + ((b * SPLIT * n_chunks + SPLIT * c) * d + offs_d) * N + n
                tl.store(ckpt_at, h_in, mask=md)
                if SPLIT == 2:
                    tl.store(ckpt_at[:, None] + d * N + 0 * t_in_chunk[None, :], h,
                             mask=md[:, None] & mid_column)
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
            z = _load_tile(z_ptr + offs_d[:, None] * s_z_d, offs_t[None, :] * s_z_l, mdt)
            y = y * z * _sigmoid(z)
        tl.store(y_ptr + offs_d[:, None] * s_y_d + offs_t[None, :] * s_y_l,
                 y.to(y_ptr.dtype.element_ty), mask=mdt)
    if STORE_LAST:
        H = tl.load(carry_ptr + (n_chunks % 2) * d * N + state_offs, mask=mdn, other=0.0)
        tl.store(last_ptr + b * d * N + state_offs, H, mask=mdn)


@triton.jit
def _scan_rows(a, x, h_in, rows, cols, ROWS: tl.constexpr, K: tl.constexpr,
               REVERSE: tl.constexpr):
    """First-order scan h_t = a_t h_{t-1} + x_t (REVERSE: h_t = a_t h_{t+1} + x_t) along time
    of [ROWS, K] tiles, time = row * K + col, entering from h_in (a scalar).

    Returns the scanned tile and, per row, its value at the row's last position in scan order.
    Each thread holds whole rows (K is the loads' vector width), so the scan within rows needs
    no shuffles, and only the per-row totals ([ROWS], one value per lane and repeat) are
    scanned across lanes. A reverse scan flips the rows within threads (free) rather than using
    `reverse=True` on the tile, which Triton lowers with a lane-reversing shuffle per element.
    """
    if REVERSE:
        aR, xR = tl.associative_scan((tl.flip(a, 1), tl.flip(x, 1)), axis=1,
                                     combine_fn=_first_order)
        aR = tl.flip(aR, 1)
        xR = tl.flip(xR, 1)
        row_end = (cols == 0)[None, :]
    else:
        aR, xR = tl.associative_scan((a, x), axis=1, combine_fn=_first_order)
        row_end = (cols == K - 1)[None, :]
    # Column extractions within a thread: the masks are compile-time per register.
    tA = tl.sum(tl.where(row_end, aR, 0.0), axis=1)
    tX = tl.sum(tl.where(row_end, xR, 0.0), axis=1)
    sA, sX = tl.associative_scan((tA, tX), axis=0, combine_fn=_first_order, reverse=REVERSE)
    H = sX + sA * h_in
    # Each row enters from its neighbour's end value (the row before, or after in reverse).
    if REVERSE:
        E = tl.where(rows == ROWS - 1, h_in, tl.gather(H, tl.minimum(rows + 1, ROWS - 1), 0))
    else:
        E = tl.where(rows == 0, h_in, tl.gather(H, tl.maximum(rows - 1, 0), 0))
    return xR + aR * E[:, None], H


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, ckpt_ptr,
    dout_ptr, carry_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
    d, L, N, n_chunks, n_ckpt,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_o_b, s_o_d, s_o_l,
    s_r_b, s_r_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr, NEED_DH0: tl.constexpr,
    ROWS: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (channel, batch row), one warp, walking the backward's chunks (the
    # forward's, or their halves: one checkpoint each) from last to first. A chunk is a
    # [ROWS, K] tile, position row * K + col, so that each thread holds whole rows
    # (see _scan_rows).
    # du, ddt, dz: contiguous (batch, d, L) in their inputs' dtypes (stored cast, so no
    # fp32 copy is written and cast again). dB, dC: zero-filled fp32 (batch, N, L).
    # dA (batch, n_chunks, d, N), dD and dbias (batch, d): partials summed by the caller.
    # carry (batch, 2, d, N): the adjoint state between chunks, slot 0 starting as the
    # gradient of the last state (or zeros); chunk i reads slot i % 2 and writes the other.
    # Reading a state's checkpoint, carry and writing its dA partial straight from global
    # memory, per state, keeps no [N]-wide tile live through the loop over states.
    BLOCK_T: tl.constexpr = ROWS * K
    b = tl.program_id(1).to(tl.int64)
    ch = tl.program_id(0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch)
    Dv = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + ch)
    u_ptr += b * s_u_b + ch * s_u_d
    dt_ptr += b * s_dt_b + ch * s_dt_d
    B_ptr += b * s_B_b
    C_ptr += b * s_C_b
    z_ptr += b * s_z_b + ch * s_z_d
    dout_ptr += b * s_o_b + ch * s_o_d
    reset_ptr += b * s_r_b
    dB_ptr += b * N * L
    dC_ptr += b * N * L
    grad_base = b * d * L + ch * L
    # (n_ckpt can exceed n_chunks by one: a last forward chunk may end in its first half.)
    ckpt_ptr += b * n_ckpt * d * N + ch * N
    carry_ptr += b * 2 * d * N + ch * N
    dA_ptr += b * n_chunks * d * N + ch * N
    dD_acc = 0.0
    dbias_acc = 0.0
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, K)
    t_in_chunk = rows[:, None] * K + cols[None, :]
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        offs = c * BLOCK_T + t_in_chunk
        m = offs < L
        # Only what the loop over states needs stays live through it (dt, dt1, dtu, dy and
        # three accumulators); u, z and dout are loaded again after it (cache hits) rather
        # than held in registers across it.
        dt = _load_delta(dt_ptr, offs * s_dt_l, m, bias, HAS_BIAS, SOFTPLUS)[0]
        dtu = dt * _load_tile(u_ptr, offs * s_u_l, m)
        dy = _load_tile(dout_ptr, offs * s_o_l, m)
        if HAS_Z:
            z = _load_tile(z_ptr, offs * s_z_l, m)
            dy = dy * z * _sigmoid(z)
        # delta one position later, for the adjoint's coefficient a_{t+1}. Past the end of
        # the sequence delta is 0, so the coefficient is 1 and the gradient of the last state
        # reaches position L - 1 unchanged.
        offs1 = offs + 1
        m1 = offs1 < L
        dt1 = _load_delta(dt_ptr, offs1 * s_dt_l, m1, bias, HAS_BIAS, SOFTPLUS)[0]
        if HAS_RESET:
            starts = tl.load(reset_ptr + offs * s_r_l, mask=m, other=0) != 0
            starts1 = tl.load(reset_ptr + offs1 * s_r_l, mask=m1, other=0) != 0
        y_pre = tl.zeros([ROWS, K], dtype=tl.float32)   # sum_n h C, for dz
        dh_B = tl.zeros([ROWS, K], dtype=tl.float32)    # sum_n dh_n B_n
        dh_Aah = tl.zeros([ROWS, K], dtype=tl.float32)  # sum_n dh_n A_n a_n h_{n,t-1}
        # Each state's inputs are loaded one iteration ahead, so that their latency overlaps
        # the previous state's scans.
        B_next = tl.load(B_ptr + offs * s_B_l, mask=m, other=0.0)
        C_next = tl.load(C_ptr + offs * s_C_l, mask=m, other=0.0)
        A_next = tl.load(A_ptr + ch * N)
        h_in_next = tl.load(ckpt_ptr + c * d * N)
        g_in_next = tl.load(carry_ptr + (i % 2) * d * N)
        for n in range(N):
            Bn = B_next.to(tl.float32)
            Cn = C_next.to(tl.float32)
            A = A_next
            h_in = h_in_next
            g_in = g_in_next
            # (The last state loads itself again rather than masking the loads.)
            nxt = tl.minimum(n + 1, N - 1)
            B_next = tl.load(B_ptr + nxt * s_B_n + offs * s_B_l, mask=m, other=0.0)
            C_next = tl.load(C_ptr + nxt * s_C_n + offs * s_C_l, mask=m, other=0.0)
            A_next = tl.load(A_ptr + ch * N + nxt)
            h_in_next = tl.load(ckpt_ptr + c * d * N + nxt)
            g_in_next = tl.load(carry_ptr + (i % 2) * d * N + nxt)
            A2 = A * LOG2E
            # Recompute this state's trajectory over the chunk from the checkpoint.
            x = dtu * Bn
            a = tl.exp2(dt * A2)
            a1 = tl.exp2(dt1 * A2)
            if HAS_RESET:
                a = tl.where(starts, 0.0, a)
                a1 = tl.where(starts1, 0.0, a1)
            h = _scan_rows(a, x, h_in, rows, cols, ROWS, K, False)[0]
            if HAS_Z:
                y_pre += h * Cn
            dh, dh_row_starts = _scan_rows(a1, dy * Cn, g_in, rows, cols, ROWS, K, True)
            # The adjoint at the chunk's first position, from the lane holding row 0.
            tl.store(carry_ptr + ((i + 1) % 2) * d * N + n + 0 * rows, dh_row_starts,
                     mask=rows == 0)
            # dB and dC sum over channels: one fp32 atomic per (channel, position), as
            # mamba_ssm does. (Two channels per program summed in registers first halves the
            # atomics but measured slower: Triton 3.6 spreads a [2, ROWS, K] tile's channel
            # axis over lanes, docs/kernels.md.)
            tl.atomic_add(dC_ptr + n * L + offs, dy * h, mask=m, sem="relaxed")
            tl.atomic_add(dB_ptr + n * L + offs, dh * dtu, mask=m, sem="relaxed")
            dh_B += dh * Bn
            # a_t h_{t-1} = h_t - x_t (reset included), so no shifted state is needed.
            dh_ah = dh * (h - x)
            dh_Aah += dh_ah * A
            tl.store(dA_ptr + c * d * N + n, tl.sum(tl.sum(dh_ah * dt, axis=1), axis=0))
        # The next (earlier) chunk reads the carries just written, possibly by other threads.
        tl.debug_barrier()
        u = _load_tile(u_ptr, offs * s_u_l, m)
        du = dh_B * dt
        if HAS_D:
            du += Dv * dy
            dD_acc += tl.sum(tl.sum(dy * u, axis=1), axis=0)
        if HAS_Z:
            dout = _load_tile(dout_ptr, offs * s_o_l, m)
            sz = _sigmoid(z)
            pre_gate = y_pre + Dv * u
            dz = dout * pre_gate * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + grad_base + offs, dz.to(dz_ptr.dtype.element_ty), mask=m)
        ddt = dh_B * u + dh_Aah
        if SOFTPLUS:
            _, dt_pre = _load_delta(dt_ptr, offs * s_dt_l, m, bias, HAS_BIAS, SOFTPLUS)
            ddt = ddt * _sigmoid(dt_pre)
        ddt = tl.where(m, ddt, 0.0)
        dbias_acc += tl.sum(tl.sum(ddt, axis=1), axis=0)
        tl.store(du_ptr + grad_base + offs, du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(ddt_ptr + grad_base + offs, ddt.to(ddt_ptr.dtype.element_ty), mask=m)
    tl.store(dD_ptr + b * d + ch, dD_acc)
    tl.store(dbias_ptr + b * d + ch, dbias_acc)
    if NEED_DH0:
        # h_0 = a_0 h_init + x_0, so d h_init = a_0 dh_0 (a_0 is 0 where a document starts).
        offs_n = tl.arange(0, BLOCK_N)
        mn = offs_n < N
        raw0 = tl.load(dt_ptr).to(tl.float32) + bias
        dt0 = raw0
        if SOFTPLUS:
            dt0 = _softplus(raw0)
        a0 = tl.exp2(dt0 * tl.load(A_ptr + ch * N + offs_n, mask=mn, other=0.0) * LOG2E)
        if HAS_RESET:
            a0 = tl.where(tl.load(reset_ptr) != 0, 0.0, a0)
        dh_first = tl.load(carry_ptr + (n_chunks % 2) * d * N + offs_n, mask=mn, other=0.0)
        tl.store(dh0_ptr + (b * d + ch) * N + offs_n, a0 * dh_first, mask=mn)


def _forward_chunk(L: int) -> int:
    """Positions per forward chunk for a sequence of length L; the backward walks halves.

    One channel per program and one warp: every reduction and layout change then stays
    inside a warp (no shared-memory round trips or block barriers in the loop over states).
    512 positions per chunk (16 per thread) was the fastest forward of the tile shapes timed
    on an H100 (docs/benchmarks.md).
    """
    return min(MAX_CHUNK, max(32, triton.next_power_of_2(L)))


def _strides3(t: torch.Tensor | None):
    return (0, 0, 0) if t is None else tuple(t.stride())


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset,
                return_last_state):
        batch, d, L = u.shape
        N = A.shape[1]
        chunk = _forward_chunk(L)
        n_chunks = triton.cdiv(L, chunk)
        A = A.float().contiguous()
        D = D.float().contiguous() if D is not None else None
        delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
        if initial_state is not None:
            initial_state = initial_state.float().contiguous()
        reset_u8 = reset.to(torch.uint8) if reset is not None else None
        needs_grad = any(ctx.needs_input_grad)
        y = torch.empty_like(u)
        ckpt = (u.new_empty((batch, BWD_SPLIT * n_chunks, d, N), dtype=torch.float32) if needs_grad
                else None)
        last = u.new_empty((batch, d, N), dtype=torch.float32) if return_last_state else None
        carry = u.new_empty((batch, 2, d, N), dtype=torch.float32)
        dummy = A
        _scan_fwd_kernel[(d, batch)](
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
            STORE_LAST=bool(return_last_state), SPLIT=BWD_SPLIT,
            BLOCK_D=1, BLOCK_T=chunk, BLOCK_N=triton.next_power_of_2(N), num_warps=1,
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
        # The backward's chunk: the forward's, or its half (the forward checkpoints both).
        chunk = _forward_chunk(L) // BWD_SPLIT
        n_chunks = triton.cdiv(L, chunk)
        # Positions per thread-held row: one 16-byte vector of the widest tile-loaded dtype.
        row = 16 // max(t.element_size() for t in (u, delta, B, C, dout, z) if t is not None)
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
        _scan_bwd_kernel[(d, batch)](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            reset_u8 if reset_u8 is not None else dummy, ckpt,
            dout, carry,
            du, ddt, dA, dB, dC, dD, dz if dz is not None else dummy, dbias,
            dh0 if dh0 is not None else dummy,
            d, L, N, n_chunks, ckpt.shape[1],
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides3(z),
            *dout.stride(), *(reset_u8.stride() if reset_u8 is not None else (0, 0)),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, HAS_RESET=reset_u8 is not None,
            NEED_DH0=ctx.has_h0,
            ROWS=chunk // row, K=row,
            BLOCK_N=triton.next_power_of_2(N), num_warps=1,
            **({"maxnreg": BWD_MAXNREG} if BWD_MAXNREG else {}),
        )
        return (
            du, ddt, dA.sum((0, 1)), dB.to(B_dt), dC.to(C_dt),
            dD.sum(0) if D is not None else None,
            dz,
            dbias.sum(0) if delta_bias is not None else None,
            None, dh0, None, None,
        )


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, initial_state=None, reset=None):
    """Drop-in for mamba_ssm's `selective_scan_fn` (its positional order), with mamba-ft's
    `initial_state` and `reset` keyword-only; semantics of `mamba_ft.ops.reference.selective_scan`."""
    B, C = normalize_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 initial_state, reset, return_last_state)
