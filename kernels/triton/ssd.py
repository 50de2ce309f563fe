"""Mamba-2 SSD chunked scan in Triton: forward and backward, state and accumulation in fp32.

Semantics are exactly `mamba_ft.ops.ssd_reference.mamba_chunk_scan_combined` (mamba_ssm's
layouts and positional order, plus mamba-ft's keyword-only `reset`):
  x, z: (batch, L, heads, head_dim)   dt: (batch, L, heads)   A, dt_bias: (heads,)
  B, C: (batch, L, groups, N)         D: (heads,) or (heads, head_dim)
  initial / final state: (batch, heads, head_dim, N) fp32.

The algorithm (SSD, Mamba-2 paper). Inside a chunk of T positions, with a_k = dt_k A and
cum_t = a_1 + ... + a_t (chunk-local, fp32):
  y_t   = sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s  +  exp(cum_t) C_t h_in  +  D x_t
  h_out = sum_s exp(cum_T - cum_s) dt_s x_s B_s^T             +  exp(cum_T) h_in
Documents (`reset`, or `seq_idx` turned into resets) mask the pairs (s, t) with a document
start in (s, t], and the entry terms of positions after a start in the chunk. Every masked
exponent is replaced by 0 *before* exp and the result by 0 after, so no inf or inf*0 reaches
values or gradients. A partial last chunk is padded with dt = 0 (decay 1, no input), so the
chunk's last slot always holds the state at the last real position.

Forward, five launches:
1. `_dt_cumsum_kernel` (chunk, batch, head block): dt + dt_bias, softplus, dt_limit clamp;
   writes dt and the chunk-local cumsum of dt*A, both fp32 (batch, heads, padded L).
2. `_cb_kernel` (t block, s block, batch*chunk*group): C_t . B_s per group, fp32
   (batch, chunks, groups, T, T). Computed once per group and read by all of its heads: with
   groups=1 and 24-64 heads, recomputing it per head would double the forward's tensor-core work.
3. `_chunk_state_kernel` (batch*chunk, head, state tile): the state each chunk builds from
   zero, x^T (B * dt * decay-to-end), by tl.dot over sub-blocks of positions.
4. `_state_pass_fwd_kernel` (state block, batch*head): the only sequential part, over chunks:
   h_in(c+1) = exp(cum_T(c)) h_in(c) + local(c), written in place over the local states, so
   the buffer ends up holding the state *entering* each chunk, plus the final state.
5. `_chunk_out_kernel` (t block, batch*chunk, head): y over one block of positions: the entry
   term C h_in scaled by exp(cum_t), then the causal intra-chunk term (CB masked by the decay
   segment matrix, times dt) @ x, block by block up to the diagonal, then D x.
z gating, y * silu(z), is plain torch around the kernels (in fp32 from the kernel's fp32
output, as the reference); it is off the measured path (Mamba-2's mixer gates in its norm).

Backward, seven launches besides CB again (the entering states are saved by the forward: saved
memory is O(batch * chunks * heads * head_dim * N), besides the inputs and the fp32 dt/cumsum).
With W = CB * decay and, per head, dcb_h[t, s] = decay_h[t, s] dt_h[s] (dy_h[t] . x_h[s]) the
gradient of y w.r.t. CB[t, s], and S_ts = CB[t, s] dcb_h[t, s] (the pair's share of
d/d(cum_t), and minus it of d/d(cum_s)):
1. `_dstate_local_kernel` (batch*chunk, head, state tile): each chunk's gradient w.r.t. its
   entering state from its own outputs, (dy * exp(cum))^T C.
2. `_state_pass_bwd_kernel` (state block, batch*head): from the last chunk back, the gradient
   G w.r.t. the state leaving each chunk, the initial state's gradient, and the gradient of
   exp(cum_T) per chunk (partials summed by torch). It writes G and a copy of the entering
   states in the inputs' dtype: the kernels below use them only as tl.dot operands.
3. `_dcb_kernel` (t block, s block <= t block, batch*chunk*group*split): dCB = sum_h dcb_h over
   the group's heads in one (block, block) fp32 accumulator, stored fp32 (batch, chunks,
   groups, T, T) like CB; per head, the row sums and column sums of S over the pair of
   blocks, written as partials indexed by the other block (each entry has one writer).
4. `_dx_kernel` (s block, batch*chunk, head): per head, one (block, head_dim) accumulator:
   W^T dy over the later blocks plus the state term w G B_s (w = exp(cum_end - cum_s)),
   giving dx, D's gradient (partials), the direct part of ddt and R_s = d/d(cum_end) of the
   state term; and, with s as the target, the entry term's d/d(cum_s), exp(cum_s) dy_s .
   (C_s h_in).
5. `_db_kernel` (s block, batch*chunk, group*split): one (block, N) accumulator:
   dB_s = sum_{t >= s} dCB[t, s] C_t + sum_h w_h[s] dt_h[s] x_h[s] G_h.
6. `_dc_kernel` (t block, batch*chunk, group*split): one (block, N) accumulator:
   dC_t = sum_{s <= t} dCB[t, s] B_s + sum_h exp(cum_h[t]) dy_h[t] h_in_h.
7. `_dt_bwd_kernel` (chunk, batch, head block): sums the cumsum's gradient (the pair
   partials, the entry and state terms), turns it into each a_k's by a reverse cumsum in
   the chunk, then ddt, dA, d(dt_bias) through clamp and softplus.
CB is recomputed for the backward by `_cb_kernel` (cheap) rather than saved, which would cost
O(L * T) per group. dCB is formed once per group, so the per-head (dy_t . x_s) products are
computed once, and dB / dC are block GEMMs against it. The per-group kernels (3, 5, 6) split a
group's heads over programs only as far as needed to fill the GPU (`MIN_PROGRAMS`); each
split writes its own dCB / dB / dC partial and torch sums them (the dB and dC kernels also deal
the dCB blocks out over the splits), so every reduction is deterministic (no atomics
anywhere). Each of these kernels holds one accumulator across its loops, which keeps them
within the registers (see NUM_WARPS / BWD_WARPS).

Precision: tl.dot takes operands in the inputs' dtype (the fp32 decay-weighted matrices are
rounded to bf16/fp16 for it, as mamba_ssm does) and accumulates in fp32; fp32 inputs use
IEEE fp32 dots (not TF32), so the fp32 path matches the reference closely.

Speed (docs/kernels.md, docs/benchmarks.md "Mamba-2 SSD"; H100, GPU time): forward+backward
is level with mamba_ssm's Triton SSD at the training shapes; the backward is slightly faster
and the forward slower (the sequential state pass, the chunk output kernel). `--sweep` in
benchmarks/ssd_speed.py times the knobs below (warps, pipelining stages, head splits,
sub-block size).

Tuning constants (module level, so tests and the benchmark can change them):
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from mamba_ft.kernels.ssd_layout import normalize_ssd_inputs

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_NO_LIMIT = (0.0, math.inf)
# Triton's CPU interpreter multiplies bf16 tl.dot operands wrongly (numpy has no bfloat16);
# there the dots take their operands widened to fp32, which gives the same products (a
# product of two bf16 values is exact in fp32), so the tests still see every rounding.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# Positions per tl.dot sub-block of a chunk (a power of two, at least 16). Tests lower it to
# exercise several sub-blocks per chunk.
BLOCK_T_MAX = 64
# Fewest programs the backward's per-group kernels (dCB, dB, dC) should launch before the heads
# of a group are split over programs (about twice an H100's 132 SMs).
MIN_PROGRAMS = 264
# Largest (head_dim, N) tile of a state per program in the chunk-state kernels (the forward's
# chunk states, the backward's dstate): 64 x 128 fp32 fits 4 warps' registers without
# spilling (ptxas, sm_90); larger states are split over programs.
STATE_TILE_MAX = (64, 128)
# Elements of a (head_dim, N) state per state-passing program.
STATE_PASS_BLOCK = 1024
# Warps of the tl.dot kernels: the forward's, and the backward's dstate, CB and dx (the mirror
# of the forward's output kernel: a (positions, head_dim) accumulator); and the backward's
# per-group kernels: dCB (a (positions, positions) accumulator besides the CB tile and the
# per-head products) and dB / dC (a (positions, N) accumulator each). At the Mamba-2-130m and
# 1.3B shapes ptxas (sm_90a) spills none of them at these counts; dCB spills at 4 warps.
NUM_WARPS = 4
BWD_WARPS = 8
# Software-pipelining stages of the backward's loops in dCB, dx, dB and dC (None: Triton's
# default).
BWD_STAGES = None


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow: max(x, 0) + log(1 + e^-|x|), in exp2/log2 form.
    return tl.maximum(x, 0.0) + LN2 * tl.log2(1.0 + tl.exp2(-tl.abs(x) * LOG2E))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in fp32; IEEE fp32 products for fp32 inputs (TF32 would cost the
    fp32 path three digits against the reference)."""
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _positions(c, blk, chunk, L, BT: tl.constexpr):
    """Chunk-local offsets of sub-block `blk`, whether they lie in the chunk, and whether
    they are real positions (< L)."""
    t = blk * BT + tl.arange(0, BT)
    in_chunk = t < chunk
    return t, in_chunk, in_chunk & (c * chunk + t < L)


@triton.jit
def _decay_matrix(cum_t, cum_s, t, s, valid_t, valid_s, doc_t, doc_s, HAS_RESET: tl.constexpr):
    """exp(cum_t - cum_s) on the causal, same-document pairs of a (t, s) tile, else 0, and
    the mask. The exponent is zeroed before exp on masked pairs (there s > t gives a positive
    exponent that may overflow)."""
    mask = (s[None, :] <= t[:, None]) & valid_t[:, None] & valid_s[None, :]
    if HAS_RESET:
        mask = mask & (doc_t[:, None] == doc_s[None, :])
    seg = tl.where(mask, cum_t[:, None] - cum_s[None, :], 0.0)
    return tl.where(mask, tl.exp2(seg * LOG2E), 0.0)


@triton.jit
def _load_rows(ptr, pos, s_l, cols, s_c, mask_rows, n_cols):
    """A (rows, cols) tile of a (…, L, …, cols) tensor: rows at positions `pos`."""
    return tl.load(ptr + pos[:, None] * s_l + cols[None, :] * s_c,
                   mask=mask_rows[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _dt_cumsum_kernel(
    dt_ptr, bias_ptr, A_ptr, dtp_ptr, cum_ptr,
    L, heads, chunk, L_pad, s_dt_b, s_dt_l, s_dt_h, dt_min, dt_max,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hs = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = hs < heads
    t = tl.arange(0, BLOCK_CHUNK)
    in_chunk = t < chunk
    pos = c * chunk + t
    valid = in_chunk & (pos < L)
    m = valid[:, None] & mh[None, :]
    raw = tl.load(dt_ptr + b * s_dt_b + pos[:, None] * s_dt_l + hs[None, :] * s_dt_h,
                  mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + hs, mask=mh, other=0.0)[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    # Padding past L gets dt = 0: decay 1 and no input, so the chunk's last slot is the state
    # at the last real position.
    dt = tl.where(m, dt, 0.0)
    A = tl.load(A_ptr + hs, mask=mh, other=0.0)
    cum = tl.cumsum(dt * A[None, :], axis=0)
    out = (b * heads + hs)[None, :] * L_pad + pos[:, None]
    mo = in_chunk[:, None] & mh[None, :]
    tl.store(dtp_ptr + out, dt, mask=mo)
    tl.store(cum_ptr + out, cum, mask=mo)


@triton.jit
def _cb_kernel(
    B_ptr, C_ptr, cb_ptr, L, chunk, n_chunks, groups, N,
    s_B_b, s_B_l, s_B_g, s_B_n, s_C_b, s_C_l, s_C_g, s_C_n,
    IEEE: tl.constexpr, BT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i = tl.program_id(0)
    j = tl.program_id(1)
    if j > i:  # above the diagonal: never read (the pairs s > t are masked)
        return
    pid = tl.program_id(2)
    g = pid % groups
    bc = pid // groups
    c = bc % n_chunks
    b = (bc // n_chunks).to(tl.int64)
    t, t_in, t_valid = _positions(c, i, chunk, L, BT)
    s, s_in, s_valid = _positions(c, j, chunk, L, BT)
    n = tl.arange(0, BLOCK_N)
    Ct = _load_rows(C_ptr + b * s_C_b + g * s_C_g, c * chunk + t, s_C_l, n, s_C_n, t_valid, N)
    Bs = _load_rows(B_ptr + b * s_B_b + g * s_B_g, c * chunk + s, s_B_l, n, s_B_n, s_valid, N)
    cb = _dot(Ct, tl.trans(Bs), IEEE)
    tl.store(cb_ptr + pid.to(tl.int64) * chunk * chunk + t[:, None] * chunk + s[None, :], cb,
             mask=t_in[:, None] & s_in[None, :])


@triton.jit
def _chunk_state_kernel(
    x_ptr, B_ptr, dtp_ptr, cum_ptr, doc_ptr, st_ptr,
    L, chunk, n_chunks, heads, heads_per_group, P, N, L_pad,
    s_x_b, s_x_l, s_x_h, s_x_p, s_B_b, s_B_l, s_B_g, s_B_n,
    HAS_RESET: tl.constexpr, IEEE: tl.constexpr,
    BT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bc = tl.program_id(0)
    h = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    p0 = (tl.program_id(2) // n_tiles) * BLOCK_P
    n0 = (tl.program_id(2) % n_tiles) * BLOCK_N
    c = bc % n_chunks
    b = (bc // n_chunks).to(tl.int64)
    g = h // heads_per_group
    row = (b * heads + h) * L_pad + c * chunk
    p = p0 + tl.arange(0, BLOCK_P)
    n = n0 + tl.arange(0, BLOCK_N)
    cum_last = tl.load(cum_ptr + row + chunk - 1)
    doc_last = 0
    if HAS_RESET:
        doc_last = tl.load(doc_ptr + b * L_pad + c * chunk + chunk - 1)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for j in range(0, tl.cdiv(chunk, BT)):
        s, s_in, s_valid = _positions(c, j, chunk, L, BT)
        cum_s = tl.load(cum_ptr + row + s, mask=s_in, other=0.0)
        dt_s = tl.load(dtp_ptr + row + s, mask=s_in, other=0.0)
        keep = s_valid
        if HAS_RESET:
            keep = keep & (tl.load(doc_ptr + b * L_pad + c * chunk + s, mask=s_in, other=0) == doc_last)
        # Input s decayed to the chunk's end; none from a document that ends inside it.
        w = tl.where(keep, tl.exp2(tl.where(keep, cum_last - cum_s, 0.0) * LOG2E) * dt_s, 0.0)
        xs = _load_rows(x_ptr + b * s_x_b + h * s_x_h, c * chunk + s, s_x_l, p, s_x_p, s_valid, P)
        Bs = _load_rows(B_ptr + b * s_B_b + g * s_B_g, c * chunk + s, s_B_l, n, s_B_n, s_valid, N)
        acc += _dot(tl.trans((xs * w[:, None]).to(Bs.dtype)), Bs, IEEE)
    out = st_ptr + (bc.to(tl.int64) * heads + h) * P * N
    tl.store(out + p[:, None] * N + n[None, :], acc, mask=(p < P)[:, None] & (n < N)[None, :])


@triton.jit
def _chunk_decay(cum_ptr, doc_ptr, b, h, c, heads, chunk, L_pad, HAS_RESET: tl.constexpr):
    """exp(cum at the chunk's end): what the state entering chunk c keeps when it leaves;
    0 if a document starts inside the chunk."""
    decay = tl.exp2(tl.load(cum_ptr + (b * heads + h) * L_pad + c * chunk + chunk - 1) * LOG2E)
    if HAS_RESET:
        decay = tl.where(tl.load(doc_ptr + b * L_pad + c * chunk + chunk - 1) == 0, decay, 0.0)
    return decay


@triton.jit
def _state_pass_fwd_kernel(
    st_ptr, cum_ptr, doc_ptr, h0_ptr, final_ptr,
    n_chunks, heads, chunk, L_pad, PN,
    HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    if HAS_H0:
        state = tl.load(h0_ptr + bh * PN + offs, mask=m, other=0.0)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(n_chunks):
        ptr = st_ptr + ((b * n_chunks + c) * heads + h) * PN + offs
        local = tl.load(ptr, mask=m, other=0.0)
        tl.store(ptr, state, mask=m)
        state = _chunk_decay(cum_ptr, doc_ptr, b, h, c, heads, chunk, L_pad, HAS_RESET) * state + local
    if STORE_FINAL:
        tl.store(final_ptr + bh * PN + offs, state, mask=m)


@triton.jit
def _chunk_out_kernel(
    x_ptr, C_ptr, D_ptr, y_ptr, dtp_ptr, cum_ptr, doc_ptr, st_ptr, cb_ptr,
    L, chunk, n_chunks, heads, heads_per_group, groups, P, N, L_pad,
    s_x_b, s_x_l, s_x_h, s_x_p, s_C_b, s_C_l, s_C_g, s_C_n, s_y_b, s_y_l, s_y_h, s_y_p,
    HAS_RESET: tl.constexpr, HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr,
    IEEE: tl.constexpr, BT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i = tl.program_id(0)
    bc = tl.program_id(1)
    h = tl.program_id(2)
    c = bc % n_chunks
    b = (bc // n_chunks).to(tl.int64)
    g = h // heads_per_group
    row = (b * heads + h) * L_pad + c * chunk
    doc_row = doc_ptr + b * L_pad + c * chunk
    cb_tile = cb_ptr + (bc.to(tl.int64) * groups + g) * chunk * chunk
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    t, t_in, t_valid = _positions(c, i, chunk, L, BT)
    cum_t = tl.load(cum_ptr + row + t, mask=t_in, other=0.0)
    doc_t = 0
    if HAS_RESET:
        doc_t = tl.load(doc_row + t, mask=t_in, other=0)
    x_head = x_ptr + b * s_x_b + h * s_x_h
    # The state entering the chunk reaches t decayed by exp(cum_t), unless a document
    # started in between.
    entry = t_valid
    if HAS_RESET:
        entry = entry & (doc_t == 0)
    entry_decay = tl.where(entry, tl.exp2(tl.where(entry, cum_t, 0.0) * LOG2E), 0.0)
    Ct = _load_rows(C_ptr + b * s_C_b + g * s_C_g, c * chunk + t, s_C_l, n, s_C_n, t_valid, N)
    h_in = tl.load(st_ptr + (bc.to(tl.int64) * heads + h) * P * N + p[:, None] * N + n[None, :],
                   mask=(p < P)[:, None] & (n < N)[None, :], other=0.0)
    acc = _dot(Ct, tl.trans(h_in.to(Ct.dtype)), IEEE) * entry_decay[:, None]
    for j in range(0, i + 1):
        s, s_in, s_valid = _positions(c, j, chunk, L, BT)
        cum_s = tl.load(cum_ptr + row + s, mask=s_in, other=0.0)
        dt_s = tl.load(dtp_ptr + row + s, mask=s_in, other=0.0)
        doc_s = 0
        if HAS_RESET:
            doc_s = tl.load(doc_row + s, mask=s_in, other=0)
        decay = _decay_matrix(cum_t, cum_s, t, s, t_valid, s_valid, doc_t, doc_s, HAS_RESET)
        cb = tl.load(cb_tile + t[:, None] * chunk + s[None, :],
                     mask=t_in[:, None] & s_in[None, :], other=0.0)
        xs = _load_rows(x_head, c * chunk + s, s_x_l, p, s_x_p, s_valid, P)
        acc += _dot((cb * decay * dt_s[None, :]).to(xs.dtype), xs, IEEE)
    if HAS_D:
        xt = _load_rows(x_head, c * chunk + t, s_x_l, p, s_x_p, t_valid, P).to(tl.float32)
        if D_PER_CHANNEL:
            acc += tl.load(D_ptr + h * P + p, mask=p < P, other=0.0)[None, :] * xt
        else:
            acc += tl.load(D_ptr + h) * xt
    y_ptrs = y_ptr + b * s_y_b + (c * chunk + t)[:, None] * s_y_l + h * s_y_h + p[None, :] * s_y_p
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_valid[:, None] & (p < P)[None, :])


@triton.jit
def _dstate_local_kernel(
    dy_ptr, C_ptr, cum_ptr, doc_ptr, ds_ptr,
    L, chunk, n_chunks, heads, heads_per_group, P, N, L_pad,
    s_dy_b, s_dy_l, s_dy_h, s_dy_p, s_C_b, s_C_l, s_C_g, s_C_n,
    HAS_RESET: tl.constexpr, IEEE: tl.constexpr,
    BT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bc = tl.program_id(0)
    h = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    p0 = (tl.program_id(2) // n_tiles) * BLOCK_P
    n0 = (tl.program_id(2) % n_tiles) * BLOCK_N
    c = bc % n_chunks
    b = (bc // n_chunks).to(tl.int64)
    g = h // heads_per_group
    row = (b * heads + h) * L_pad + c * chunk
    p = p0 + tl.arange(0, BLOCK_P)
    n = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for i in range(0, tl.cdiv(chunk, BT)):
        t, t_in, t_valid = _positions(c, i, chunk, L, BT)
        cum_t = tl.load(cum_ptr + row + t, mask=t_in, other=0.0)
        entry = t_valid
        if HAS_RESET:
            entry = entry & (tl.load(doc_ptr + b * L_pad + c * chunk + t, mask=t_in, other=0) == 0)
        entry_decay = tl.where(entry, tl.exp2(tl.where(entry, cum_t, 0.0) * LOG2E), 0.0)
        dyt = _load_rows(dy_ptr + b * s_dy_b + h * s_dy_h, c * chunk + t, s_dy_l, p, s_dy_p,
                         t_valid, P)
        Ct = _load_rows(C_ptr + b * s_C_b + g * s_C_g, c * chunk + t, s_C_l, n, s_C_n, t_valid, N)
        acc += _dot(tl.trans((dyt * entry_decay[:, None]).to(Ct.dtype)), Ct, IEEE)
    out = ds_ptr + (bc.to(tl.int64) * heads + h) * P * N
    tl.store(out + p[:, None] * N + n[None, :], acc, mask=(p < P)[:, None] & (n < N)[None, :])


@triton.jit
def _state_pass_bwd_kernel(
    ds_ptr, st_ptr, cum_ptr, doc_ptr, dfinal_ptr, dh0_ptr, ddecay_ptr, g_lp_ptr, st_lp_ptr,
    n_chunks, heads, chunk, L_pad, PN, n_blocks,
    HAS_RESET: tl.constexpr, HAS_DFINAL: tl.constexpr, NEED_DH0: tl.constexpr,
    BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    # grad: dL/d(state leaving chunk c), starting from the final state's gradient. It and the
    # state entering each chunk are also written in the inputs' dtype (g_lp, st_lp): the
    # dx, dB and dC kernels take them only as tl.dot operands, and loading them narrow halves
    # their registers there (a (head_dim, N) fp32 tile is 64 registers a thread at 4 warps).
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + bh * PN + offs, mask=m, other=0.0)
    else:
        grad = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(n_chunks):
        c = n_chunks - 1 - k
        at = ((b * n_chunks + c) * heads + h) * PN + offs
        local = tl.load(ds_ptr + at, mask=m, other=0.0)
        tl.store(g_lp_ptr + at, grad.to(g_lp_ptr.dtype.element_ty), mask=m)
        decay = _chunk_decay(cum_ptr, doc_ptr, b, h, c, heads, chunk, L_pad, HAS_RESET)
        h_in = tl.load(st_ptr + at, mask=m, other=0.0)
        tl.store(st_lp_ptr + at, h_in.to(st_lp_ptr.dtype.element_ty), mask=m)
        # d/d(cum at the chunk's end) of decay * h_in, this block's share.
        tl.store(ddecay_ptr + (bh * n_chunks + c) * n_blocks + blk, decay * tl.sum(grad * h_in))
        grad = local + decay * grad
    if NEED_DH0:
        tl.store(dh0_ptr + bh * PN + offs, grad, mask=m)


@triton.jit
def _dcb_kernel(
    x_ptr, dy_ptr, dtp_ptr, cum_ptr, doc_ptr, cb_ptr, dcb_ptr, dpair_ptr,
    L, chunk, n_chunks, heads, heads_per_group, groups, splits, P, L_pad, batch,
    s_x_b, s_x_l, s_x_h, s_x_p, s_dy_b, s_dy_l, s_dy_h, s_dy_p,
    HEADS_PER_PROGRAM: tl.constexpr, HAS_RESET: tl.constexpr, IEEE: tl.constexpr,
    BT: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program per (target block i, source block j <= i, batch*chunk*group*split): the
    # gradient of y w.r.t. CB_ts summed over the split's heads,
    #   dCB[t, s] = sum_h decay_h[t, s] dt_h[s] (dy_h[t] . x_h[s]),
    # and per head the sums of S_ts = CB_ts dcb_h[t, s] (the pair's share of d/d(cum_t), and
    # minus it of d/d(cum_s)). Those go to dpair (blocks, batch, heads, L_pad): the row sums
    # over this s block at [j, t], minus the column sums over this t block at [i, s] (their
    # difference at [i, t] on the diagonal), so each entry has one writer and _dt_bwd_kernel
    # sums over the first axis.
    i = tl.program_id(0)
    j = tl.program_id(1)
    if j > i:  # above the diagonal: every pair is masked
        return
    pid = tl.program_id(2)
    split = pid % splits
    bcg = pid // splits
    g = bcg % groups
    bc = bcg // groups
    c = bc % n_chunks
    b = (bc // n_chunks).to(tl.int64)
    p = tl.arange(0, BLOCK_P)
    t, t_in, t_valid = _positions(c, i, chunk, L, BT)
    s, s_in, s_valid = _positions(c, j, chunk, L, BT)
    doc_t = 0
    doc_s = 0
    if HAS_RESET:
        doc_t = tl.load(doc_ptr + b * L_pad + c * chunk + t, mask=t_in, other=0)
        doc_s = tl.load(doc_ptr + b * L_pad + c * chunk + s, mask=s_in, other=0)
    pair = t_in[:, None] & s_in[None, :]
    cb = tl.load(cb_ptr + bcg.to(tl.int64) * chunk * chunk + t[:, None] * chunk + s[None, :],
                 mask=pair, other=0.0)
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for k in range(HEADS_PER_PROGRAM):
        h = g * heads_per_group + split * HEADS_PER_PROGRAM + k
        row = (b * heads + h) * L_pad + c * chunk
        cum_t = tl.load(cum_ptr + row + t, mask=t_in, other=0.0)
        cum_s = tl.load(cum_ptr + row + s, mask=s_in, other=0.0)
        dt_s = tl.load(dtp_ptr + row + s, mask=s_in, other=0.0)
        decay = _decay_matrix(cum_t, cum_s, t, s, t_valid, s_valid, doc_t, doc_s, HAS_RESET)
        dyt = _load_rows(dy_ptr + b * s_dy_b + h * s_dy_h, c * chunk + t, s_dy_l, p, s_dy_p,
                         t_valid, P)
        xs = _load_rows(x_ptr + b * s_x_b + h * s_x_h, c * chunk + s, s_x_l, p, s_x_p, s_valid, P)
        dcb = decay * dt_s[None, :] * _dot(dyt, tl.trans(xs.to(dyt.dtype)), IEEE)
        acc += dcb
        pair_grad = cb * dcb
        rows = tl.sum(pair_grad, axis=1)
        cols = tl.sum(pair_grad, axis=0)
        if i == j:
            tl.store(dpair_ptr + ((i * batch + b) * heads + h) * L_pad + c * chunk + t,
                     rows - cols, mask=t_in)
        else:
            tl.store(dpair_ptr + ((j * batch + b) * heads + h) * L_pad + c * chunk + t,
                     rows, mask=t_in)
            tl.store(dpair_ptr + ((i * batch + b) * heads + h) * L_pad + c * chunk + s,
                     -cols, mask=s_in)
    out = dcb_ptr + (split * (tl.num_programs(2) // splits) + bcg).to(tl.int64) * chunk * chunk
    tl.store(out + t[:, None] * chunk + s[None, :], acc, mask=pair)


@triton.jit
def _dx_kernel(
    x_ptr, B_ptr, C_ptr, D_ptr, dy_ptr, dtp_ptr, cum_ptr, doc_ptr, cb_ptr, g_lp_ptr, st_lp_ptr,
    dx_ptr, ddt_ptr, dcum_ptr, dend_ptr, dD_ptr,
    L, chunk, n_chunks, heads, heads_per_group, groups, P, N, L_pad,
    s_x_b, s_x_l, s_x_h, s_x_p, s_B_b, s_B_l, s_B_g, s_B_n, s_C_b, s_C_l, s_C_g, s_C_n,
    s_dy_b, s_dy_l, s_dy_h, s_dy_p, s_dx_b, s_dx_l, s_dx_h, s_dx_p,
    HAS_RESET: tl.constexpr, HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr,
    IEEE: tl.constexpr, BT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (block of positions s, batch*chunk, head): the per-head gradients at s.
    # As sources: d y / d(dt_s x_s) = W^T dy over the later positions t (W = CB * decay) plus
    # the state leaving the chunk, whose gradient G reaches s through w = exp(cum_end - cum_s);
    # from it dx, D's gradient (partials), the direct part of ddt and R_s = d/d(cum_end) of
    # the state term. As targets: the entry term's d/d(cum_s), exp(cum_s) dy_s . (C_s h_in).
    # dcum gets the entry term minus R_s; dend gets R_s (both (batch, heads, L_pad)).
    j = tl.program_id(0)
    bc = tl.program_id(1)
    h = tl.program_id(2)
    c = bc % n_chunks
    b = (bc // n_chunks).to(tl.int64)
    g = h // heads_per_group
    row = (b * heads + h) * L_pad + c * chunk
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    mp = p < P
    state_mask = mp[:, None] & (n < N)[None, :]
    s, s_in, s_valid = _positions(c, j, chunk, L, BT)
    s_pos = c * chunk + s
    doc_row = doc_ptr + b * L_pad + c * chunk
    doc_s = 0
    to_end = s_valid
    entry = s_valid
    if HAS_RESET:
        doc_s = tl.load(doc_row + s, mask=s_in, other=0)
        to_end = to_end & (doc_s == tl.load(doc_row + chunk - 1))
        entry = entry & (doc_s == 0)
    cum_s = tl.load(cum_ptr + row + s, mask=s_in, other=0.0)
    dt_s = tl.load(dtp_ptr + row + s, mask=s_in, other=0.0)
    dy_head = dy_ptr + b * s_dy_b + h * s_dy_h
    # The terms without a sum over t first, so that their (s, head_dim) tiles are dead before
    # the loop (whose accumulator starts from the state term); x_s and dy_s are loaded again
    # after it rather than held across it.
    x_at = x_ptr + b * s_x_b + h * s_x_h
    dys = _load_rows(dy_head, s_pos, s_dy_l, p, s_dy_p, s_valid, P).to(tl.float32)
    xs = _load_rows(x_at, s_pos, s_x_l, p, s_x_p, s_valid, P).to(tl.float32)
    h_in = tl.load(st_lp_ptr + (bc.to(tl.int64) * heads + h) * P * N + p[:, None] * N
                   + n[None, :], mask=state_mask, other=0.0)
    Cs = _load_rows(C_ptr + b * s_C_b + g * s_C_g, s_pos, s_C_l, n, s_C_n, s_valid, N)
    entry_decay = tl.where(entry, tl.exp2(tl.where(entry, cum_s, 0.0) * LOG2E), 0.0)
    q = entry_decay * tl.sum(dys * _dot(Cs, tl.trans(h_in.to(Cs.dtype)), IEEE), axis=1)
    G = tl.load(g_lp_ptr + (bc.to(tl.int64) * heads + h) * P * N + p[:, None] * N + n[None, :],
                mask=state_mask, other=0.0)
    Bs = _load_rows(B_ptr + b * s_B_b + g * s_B_g, s_pos, s_B_l, n, s_B_n, s_valid, N)
    cum_end = tl.load(cum_ptr + row + chunk - 1)
    w = tl.where(to_end, tl.exp2(tl.where(to_end, cum_end - cum_s, 0.0) * LOG2E), 0.0)
    acc = w[:, None] * _dot(Bs, tl.trans(G.to(Bs.dtype)), IEEE)  # (s, p)
    r = dt_s * tl.sum(xs * acc, axis=1)
    tl.store(dcum_ptr + row + s, q - r, mask=s_in)
    tl.store(dend_ptr + row + s, r, mask=s_in)
    cb_tile = cb_ptr + (bc.to(tl.int64) * groups + g) * chunk * chunk
    for i in range(j, tl.cdiv(chunk, BT)):
        t, t_in, t_valid = _positions(c, i, chunk, L, BT)
        cum_t = tl.load(cum_ptr + row + t, mask=t_in, other=0.0)
        doc_t = 0
        if HAS_RESET:
            doc_t = tl.load(doc_row + t, mask=t_in, other=0)
        decay = _decay_matrix(cum_t, cum_s, t, s, t_valid, s_valid, doc_t, doc_s, HAS_RESET)
        cb = tl.load(cb_tile + t[:, None] * chunk + s[None, :],
                     mask=t_in[:, None] & s_in[None, :], other=0.0)
        dyt = _load_rows(dy_head, c * chunk + t, s_dy_l, p, s_dy_p, t_valid, P)
        acc += _dot(tl.trans((cb * decay).to(dyt.dtype)), dyt, IEEE)
    xs = _load_rows(x_at, s_pos, s_x_l, p, s_x_p, s_valid, P).to(tl.float32)
    tl.store(ddt_ptr + row + s, tl.sum(xs * acc, axis=1), mask=s_in)
    dx = dt_s[:, None] * acc
    if HAS_D:
        dys = _load_rows(dy_head, s_pos, s_dy_l, p, s_dy_p, s_valid, P).to(tl.float32)
        if D_PER_CHANNEL:
            dx += tl.load(D_ptr + h * P + p, mask=mp, other=0.0)[None, :] * dys
        else:
            dx += tl.load(D_ptr + h) * dys
        tl.store(dD_ptr + ((bc.to(tl.int64) * tl.num_programs(0) + j) * heads + h) * P + p,
                 tl.sum(dys * xs, axis=0), mask=mp)
    tl.store(dx_ptr + b * s_dx_b + s_pos[:, None] * s_dx_l + h * s_dx_h + p[None, :] * s_dx_p,
             dx.to(dx_ptr.dtype.element_ty), mask=s_valid[:, None] & mp[None, :])


@triton.jit
def _block_group_split(n_chunks, splits):
    """The coordinates of a (position block, batch*chunk, group*split) program: (block,
    batch*chunk, group, split, chunk, batch)."""
    bc = tl.program_id(1)
    gs = tl.program_id(2)
    return (tl.program_id(0), bc, gs // splits, gs % splits, bc % n_chunks,
            (bc // n_chunks).to(tl.int64))


@triton.jit
def _db_kernel(
    x_ptr, C_ptr, dtp_ptr, cum_ptr, doc_ptr, dcb_ptr, g_lp_ptr, dB_ptr,
    L, chunk, n_chunks, heads, heads_per_group, groups, splits, P, N, L_pad,
    s_x_b, s_x_l, s_x_h, s_x_p, s_C_b, s_C_l, s_C_g, s_C_n,
    HEADS_PER_PROGRAM: tl.constexpr, HAS_RESET: tl.constexpr, IEEE: tl.constexpr,
    BT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (source block s, batch*chunk, group*split), one (s, N) accumulator:
    #   dB_s = sum_{t >= s} dCB[t, s] C_t  +  sum_h w_h[s] dt_h[s] x_h[s] G_h,
    # the split taking every splits-th t block and its share of the group's heads; torch sums
    # the splits' partials.
    j, bc, g, split, c, b = _block_group_split(n_chunks, splits)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    s, s_in, s_valid = _positions(c, j, chunk, L, BT)
    s_pos = c * chunk + s
    dcb_tile = dcb_ptr + (bc.to(tl.int64) * groups + g) * chunk * chunk
    acc = tl.zeros([BT, BLOCK_N], dtype=tl.float32)
    for i in range(j + split, tl.cdiv(chunk, BT), splits):
        t, t_in, t_valid = _positions(c, i, chunk, L, BT)
        dcb = tl.load(dcb_tile + t[:, None] * chunk + s[None, :],
                      mask=t_in[:, None] & s_in[None, :], other=0.0)
        Ct = _load_rows(C_ptr + b * s_C_b + g * s_C_g, c * chunk + t, s_C_l, n, s_C_n,
                        t_valid, N)
        acc += _dot(tl.trans(dcb.to(Ct.dtype)), Ct, IEEE)
    to_end = s_valid
    if HAS_RESET:
        doc_row = doc_ptr + b * L_pad + c * chunk
        to_end = to_end & (tl.load(doc_row + s, mask=s_in, other=0) == tl.load(doc_row + chunk - 1))
    for k in range(HEADS_PER_PROGRAM):
        h = g * heads_per_group + split * HEADS_PER_PROGRAM + k
        row = (b * heads + h) * L_pad + c * chunk
        cum_s = tl.load(cum_ptr + row + s, mask=s_in, other=0.0)
        dt_s = tl.load(dtp_ptr + row + s, mask=s_in, other=0.0)
        cum_end = tl.load(cum_ptr + row + chunk - 1)
        w = tl.where(to_end, tl.exp2(tl.where(to_end, cum_end - cum_s, 0.0) * LOG2E) * dt_s, 0.0)
        xs = _load_rows(x_ptr + b * s_x_b + h * s_x_h, s_pos, s_x_l, p, s_x_p, s_valid, P)
        G = tl.load(g_lp_ptr + (bc.to(tl.int64) * heads + h) * P * N + p[:, None] * N
                    + n[None, :], mask=(p < P)[:, None] & (n < N)[None, :], other=0.0)
        acc += _dot((xs * w[:, None]).to(G.dtype), G, IEEE)
    dB_at = dB_ptr + ((split * tl.num_programs(1) + bc).to(tl.int64) * chunk + s[:, None]) * groups * N
    tl.store(dB_at + g * N + n[None, :], acc, mask=s_in[:, None] & (n < N)[None, :])


@triton.jit
def _dc_kernel(
    B_ptr, dy_ptr, cum_ptr, doc_ptr, dcb_ptr, st_lp_ptr, dC_ptr,
    L, chunk, n_chunks, heads, heads_per_group, groups, splits, P, N, L_pad,
    s_B_b, s_B_l, s_B_g, s_B_n, s_dy_b, s_dy_l, s_dy_h, s_dy_p,
    HEADS_PER_PROGRAM: tl.constexpr, HAS_RESET: tl.constexpr, IEEE: tl.constexpr,
    BT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (target block t, batch*chunk, group*split), one (t, N) accumulator:
    #   dC_t = sum_{s <= t} dCB[t, s] B_s  +  sum_h exp(cum_h[t]) dy_h[t] h_in_h,
    # split as _db_kernel's.
    i, bc, g, split, c, b = _block_group_split(n_chunks, splits)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    t, t_in, t_valid = _positions(c, i, chunk, L, BT)
    dcb_tile = dcb_ptr + (bc.to(tl.int64) * groups + g) * chunk * chunk
    acc = tl.zeros([BT, BLOCK_N], dtype=tl.float32)
    for j in range(split, i + 1, splits):
        s, s_in, s_valid = _positions(c, j, chunk, L, BT)
        dcb = tl.load(dcb_tile + t[:, None] * chunk + s[None, :],
                      mask=t_in[:, None] & s_in[None, :], other=0.0)
        Bs = _load_rows(B_ptr + b * s_B_b + g * s_B_g, c * chunk + s, s_B_l, n, s_B_n,
                        s_valid, N)
        acc += _dot(dcb.to(Bs.dtype), Bs, IEEE)
    entry = t_valid
    if HAS_RESET:
        entry = entry & (tl.load(doc_ptr + b * L_pad + c * chunk + t, mask=t_in, other=0) == 0)
    for k in range(HEADS_PER_PROGRAM):
        h = g * heads_per_group + split * HEADS_PER_PROGRAM + k
        cum_t = tl.load(cum_ptr + (b * heads + h) * L_pad + c * chunk + t, mask=t_in, other=0.0)
        entry_decay = tl.where(entry, tl.exp2(tl.where(entry, cum_t, 0.0) * LOG2E), 0.0)
        dyt = _load_rows(dy_ptr + b * s_dy_b + h * s_dy_h, c * chunk + t, s_dy_l, p, s_dy_p,
                         t_valid, P)
        h_in = tl.load(st_lp_ptr + (bc.to(tl.int64) * heads + h) * P * N + p[:, None] * N
                       + n[None, :], mask=(p < P)[:, None] & (n < N)[None, :], other=0.0)
        acc += _dot((dyt * entry_decay[:, None]).to(h_in.dtype), h_in, IEEE)
    dC_at = dC_ptr + ((split * tl.num_programs(1) + bc).to(tl.int64) * chunk + t[:, None]) * groups * N
    tl.store(dC_at + g * N + n[None, :], acc, mask=t_in[:, None] & (n < N)[None, :])


@triton.jit
def _dt_bwd_kernel(
    dt_ptr, bias_ptr, A_ptr, dtp_ptr, dcum_ptr, dpair_ptr, dend_ptr, ddt_dir_ptr,
    ddecay_ptr, ddt_ptr, dA_ptr, dbias_ptr,
    L, heads, chunk, n_chunks, L_pad, n_sub, s_dt_b, s_dt_l, s_dt_h, s_ddt_b, s_ddt_l, s_ddt_h,
    dt_min, dt_max,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
):
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hs = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = hs < heads
    t = tl.arange(0, BLOCK_CHUNK)
    in_chunk = t < chunk
    pos = c * chunk + t
    valid = in_chunk & (pos < L)
    mi = in_chunk[:, None] & mh[None, :]
    m = valid[:, None] & mh[None, :]
    buf = (b * heads + hs)[None, :] * L_pad + pos[:, None]
    dcum = tl.load(dcum_ptr + buf, mask=mi, other=0.0)
    # The pairs' shares, one partial per block of the other side of the pair (_dcb_kernel).
    for k in range(n_sub):
        dcum += tl.load(dpair_ptr + (k * tl.num_programs(1) * heads).to(tl.int64) * L_pad + buf,
                        mask=mi, other=0.0)
    # d/d(cum at the chunk's end): the inputs' decay to the end, and the entering state's.
    d_end = (tl.sum(tl.load(dend_ptr + buf, mask=mi, other=0.0), axis=0)
             + tl.load(ddecay_ptr + (b * heads + hs) * n_chunks + c, mask=mh, other=0.0))
    dcum += tl.where((t == chunk - 1)[:, None], d_end[None, :], 0.0)
    # cum_t = a_1 + ... + a_t, so d a_k = sum_{t >= k} d cum_t.
    da = tl.cumsum(dcum, axis=0, reverse=True)
    A = tl.load(A_ptr + hs, mask=mh, other=0.0)
    dt = tl.load(dtp_ptr + buf, mask=mi, other=0.0)
    tl.store(dA_ptr + (b * tl.num_programs(0) + c) * heads + hs, tl.sum(da * dt, axis=0), mask=mh)
    ddt = tl.load(ddt_dir_ptr + buf, mask=mi, other=0.0) + da * A[None, :]
    if SOFTPLUS or CLAMP:
        raw = tl.load(dt_ptr + b * s_dt_b + pos[:, None] * s_dt_l + hs[None, :] * s_dt_h,
                      mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + hs, mask=mh, other=0.0)[None, :]
        if CLAMP:
            # The clamp passes the gradient where dt lies inside [dt_min, dt_max] (as
            # torch.clamp's backward, bounds included).
            soft = raw
            if SOFTPLUS:
                soft = _softplus(raw)
            ddt = tl.where((soft >= dt_min) & (soft <= dt_max), ddt, 0.0)
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp2(-raw * LOG2E))
    ddt = tl.where(m, ddt, 0.0)
    tl.store(ddt_ptr + b * s_ddt_b + pos[:, None] * s_ddt_l + hs[None, :] * s_ddt_h,
             ddt.to(ddt_ptr.dtype.element_ty), mask=m)
    if HAS_BIAS:
        tl.store(dbias_ptr + (b * tl.num_programs(0) + c) * heads + hs, tl.sum(ddt, axis=0),
                 mask=mh)


def _tile(n: int) -> int:
    """A tl.dot dimension: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def _head_splits(heads_per_group: int, base_programs: int) -> int:
    """Programs to spread each group's heads over in the backward's per-group kernels: the
    fewest (a divisor of heads_per_group) that launch MIN_PROGRAMS programs."""
    for splits in range(1, heads_per_group + 1):
        if heads_per_group % splits == 0 and base_programs * splits >= MIN_PROGRAMS:
            return splits
    return heads_per_group


class _Geometry:
    """The sizes every launch needs, from the inputs' shapes and the chunk size."""

    def __init__(self, x, B, chunk_size):
        self.batch, self.L, self.heads, self.P = x.shape
        self.groups, self.N = B.shape[2], B.shape[3]
        self.heads_per_group = self.heads // self.groups
        self.chunk = chunk_size
        self.n_chunks = triton.cdiv(self.L, chunk_size)
        self.L_pad = self.n_chunks * chunk_size
        self.BT = min(BLOCK_T_MAX, _tile(chunk_size))
        self.n_sub = triton.cdiv(chunk_size, self.BT)
        self.BLOCK_P = _tile(self.P)
        self.BLOCK_N = _tile(self.N)
        self.STATE_TILE_P = min(self.BLOCK_P, STATE_TILE_MAX[0])
        self.STATE_TILE_N = min(self.BLOCK_N, STATE_TILE_MAX[1])
        self.state_tiles = (triton.cdiv(self.P, self.STATE_TILE_P)
                            * triton.cdiv(self.N, self.STATE_TILE_N))
        self.BLOCK_CHUNK = triton.next_power_of_2(chunk_size)
        self.BLOCK_H = min(8, triton.next_power_of_2(self.heads))


def _strides4(t):
    return tuple(t.stride())


def _cb(geo, B, C, ieee):
    """C_t . B_s per chunk and group, fp32 (batch, chunks, groups, T, T)."""
    cb = torch.empty((geo.batch, geo.n_chunks, geo.groups, geo.chunk, geo.chunk),
                     device=B.device, dtype=torch.float32)
    _cb_kernel[(geo.n_sub, geo.n_sub, geo.batch * geo.n_chunks * geo.groups)](
        B, C, cb, geo.L, geo.chunk, geo.n_chunks, geo.groups, geo.N,
        *_strides4(B), *_strides4(C),
        IEEE=ieee, BT=geo.BT, BLOCK_N=geo.BLOCK_N, num_warps=NUM_WARPS)
    return cb


class _SSDFunction(torch.autograd.Function):
    """The SSD scan without z (see the module docstring); y in `out_dtype`."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, initial_states, doc, chunk_size, softplus,
                dt_limit, out_dtype):
        geo = _Geometry(x, B, chunk_size)
        dev = x.device
        f32 = dict(device=dev, dtype=torch.float32)
        clamp = tuple(dt_limit) != _NO_LIMIT
        dt_min, dt_max = (float(dt_limit[0]), float(dt_limit[1])) if clamp else (0.0, 0.0)
        A32 = A.float().contiguous()
        D32 = D.float().contiguous() if D is not None else None
        bias32 = dt_bias.float().contiguous() if dt_bias is not None else None
        h0 = initial_states.float().contiguous() if initial_states is not None else None
        ieee = x.dtype == torch.float32
        dummy = A32
        dtp = torch.empty((geo.batch, geo.heads, geo.L_pad), **f32)
        cum = torch.empty_like(dtp)
        _dt_cumsum_kernel[(geo.n_chunks, geo.batch, triton.cdiv(geo.heads, geo.BLOCK_H))](
            dt, bias32 if bias32 is not None else dummy, A32, dtp, cum,
            geo.L, geo.heads, geo.chunk, geo.L_pad, *dt.stride(), dt_min, dt_max,
            HAS_BIAS=bias32 is not None, SOFTPLUS=bool(softplus), CLAMP=clamp,
            BLOCK_CHUNK=geo.BLOCK_CHUNK, BLOCK_H=geo.BLOCK_H)
        doc_arg = doc if doc is not None else dummy
        has_reset = doc is not None
        cb = _cb(geo, B, C, ieee)
        states = torch.empty((geo.batch, geo.n_chunks, geo.heads, geo.P, geo.N), **f32)
        _chunk_state_kernel[(geo.batch * geo.n_chunks, geo.heads, geo.state_tiles)](
            x, B, dtp, cum, doc_arg, states,
            geo.L, geo.chunk, geo.n_chunks, geo.heads, geo.heads_per_group, geo.P, geo.N,
            geo.L_pad, *_strides4(x), *_strides4(B),
            HAS_RESET=has_reset, IEEE=ieee, BT=geo.BT, BLOCK_P=geo.STATE_TILE_P,
            BLOCK_N=geo.STATE_TILE_N, num_warps=NUM_WARPS)
        final = torch.empty((geo.batch, geo.heads, geo.P, geo.N), **f32)
        PN = geo.P * geo.N
        _state_pass_fwd_kernel[(triton.cdiv(PN, STATE_PASS_BLOCK), geo.batch * geo.heads)](
            states, cum, doc_arg, h0 if h0 is not None else dummy, final,
            geo.n_chunks, geo.heads, geo.chunk, geo.L_pad, PN,
            HAS_RESET=has_reset, HAS_H0=h0 is not None, STORE_FINAL=True,
            BLOCK=STATE_PASS_BLOCK)
        y = torch.empty(x.shape, device=dev, dtype=out_dtype)
        _chunk_out_kernel[(geo.n_sub, geo.batch * geo.n_chunks, geo.heads)](
            x, C, D32 if D32 is not None else dummy, y, dtp, cum, doc_arg, states, cb,
            geo.L, geo.chunk, geo.n_chunks, geo.heads, geo.heads_per_group, geo.groups,
            geo.P, geo.N, geo.L_pad, *_strides4(x), *_strides4(C), *_strides4(y),
            HAS_RESET=has_reset, HAS_D=D32 is not None,
            D_PER_CHANNEL=D32 is not None and D32.dim() == 2,
            IEEE=ieee, BT=geo.BT, BLOCK_P=geo.BLOCK_P, BLOCK_N=geo.BLOCK_N,
            num_warps=NUM_WARPS)
        ctx.save_for_backward(x, dt, A32, B, C, D32, bias32, doc, dtp, cum, states)
        ctx.geo = geo
        ctx.flags = (bool(softplus), clamp, dt_min, dt_max, h0 is not None, ieee)
        ctx.dtypes = (A.dtype, D.dtype if D is not None else None,
                      dt_bias.dtype if dt_bias is not None else None,
                      initial_states.dtype if initial_states is not None else None)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A32, B, C, D32, bias32, doc, dtp, cum, states = ctx.saved_tensors
        geo = ctx.geo
        softplus, clamp, dt_min, dt_max, has_h0, ieee = ctx.flags
        A_dtype, D_dtype, bias_dtype, h0_dtype = ctx.dtypes
        dev = x.device
        f32 = dict(device=dev, dtype=torch.float32)
        has_reset = doc is not None
        doc_arg = doc if has_reset else A32
        dummy = A32
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)  # the dots take both operands in x's dtype
        PN = geo.P * geo.N
        cb = _cb(geo, B, C, ieee)
        dstates = torch.empty_like(states)
        # The gradient of the state leaving each chunk, and the entering states, as tl.dot
        # operands in the inputs' dtype (see _state_pass_bwd_kernel).
        g_lp = torch.empty(states.shape, device=dev, dtype=x.dtype)
        states_lp = torch.empty_like(g_lp)
        _dstate_local_kernel[(geo.batch * geo.n_chunks, geo.heads, geo.state_tiles)](
            dy, C, cum, doc_arg, dstates,
            geo.L, geo.chunk, geo.n_chunks, geo.heads, geo.heads_per_group, geo.P, geo.N,
            geo.L_pad, *_strides4(dy), *_strides4(C),
            HAS_RESET=has_reset, IEEE=ieee, BT=geo.BT, BLOCK_P=geo.STATE_TILE_P,
            BLOCK_N=geo.STATE_TILE_N, num_warps=NUM_WARPS)
        n_blocks = triton.cdiv(PN, STATE_PASS_BLOCK)
        ddecay = torch.empty((geo.batch, geo.heads, geo.n_chunks, n_blocks), **f32)
        dh0 = torch.empty((geo.batch, geo.heads, geo.P, geo.N), **f32) if has_h0 else None
        _state_pass_bwd_kernel[(n_blocks, geo.batch * geo.heads)](
            dstates, states, cum, doc_arg,
            dfinal.float().contiguous() if dfinal is not None else dummy,
            dh0 if dh0 is not None else dummy, ddecay, g_lp, states_lp,
            geo.n_chunks, geo.heads, geo.chunk, geo.L_pad, PN, n_blocks,
            HAS_RESET=has_reset, HAS_DFINAL=dfinal is not None, NEED_DH0=has_h0,
            BLOCK=STATE_PASS_BLOCK)
        ddecay = ddecay.sum(-1)
        n_bc = geo.batch * geo.n_chunks
        stages = {"num_stages": BWD_STAGES} if BWD_STAGES else {}
        # dCB per group: one program per pair of blocks on or below the diagonal.
        n_pairs = geo.n_sub * (geo.n_sub + 1) // 2
        pair_splits = _head_splits(geo.heads_per_group, n_pairs * n_bc * geo.groups)
        dcb = torch.empty((pair_splits, n_bc * geo.groups, geo.chunk, geo.chunk), **f32)
        dpair = torch.empty((geo.n_sub, geo.batch, geo.heads, geo.L_pad), **f32)
        _dcb_kernel[(geo.n_sub, geo.n_sub, n_bc * geo.groups * pair_splits)](
            x, dy, dtp, cum, doc_arg, cb, dcb, dpair,
            geo.L, geo.chunk, geo.n_chunks, geo.heads, geo.heads_per_group, geo.groups,
            pair_splits, geo.P, geo.L_pad, geo.batch, *_strides4(x), *_strides4(dy),
            HEADS_PER_PROGRAM=geo.heads_per_group // pair_splits, HAS_RESET=has_reset,
            IEEE=ieee, BT=geo.BT, BLOCK_P=geo.BLOCK_P, num_warps=BWD_WARPS, **stages)
        dcb = dcb.sum(0) if pair_splits > 1 else dcb[0]
        dx = torch.empty(x.shape, device=dev, dtype=x.dtype)
        ddt_direct = torch.empty_like(dtp)
        dcum = torch.empty_like(dtp)
        dend = torch.empty_like(dtp)
        dD = (torch.empty((n_bc, geo.n_sub, geo.heads, geo.P), **f32)
              if D32 is not None else None)
        _dx_kernel[(geo.n_sub, n_bc, geo.heads)](
            x, B, C, D32 if D32 is not None else dummy, dy, dtp, cum, doc_arg, cb, g_lp,
            states_lp, dx, ddt_direct, dcum, dend, dD if dD is not None else dummy,
            geo.L, geo.chunk, geo.n_chunks, geo.heads, geo.heads_per_group, geo.groups,
            geo.P, geo.N, geo.L_pad,
            *_strides4(x), *_strides4(B), *_strides4(C), *_strides4(dy), *_strides4(dx),
            HAS_RESET=has_reset, HAS_D=D32 is not None,
            D_PER_CHANNEL=D32 is not None and D32.dim() == 2, IEEE=ieee,
            BT=geo.BT, BLOCK_P=geo.BLOCK_P, BLOCK_N=geo.BLOCK_N, num_warps=NUM_WARPS, **stages)
        # dB and dC per group: one program per block of positions (and head split).
        splits = _head_splits(geo.heads_per_group, geo.n_sub * n_bc * geo.groups)
        grid = (geo.n_sub, n_bc, geo.groups * splits)
        per_group = (geo.L, geo.chunk, geo.n_chunks, geo.heads, geo.heads_per_group, geo.groups,
                     splits, geo.P, geo.N, geo.L_pad)
        tiles = dict(HEADS_PER_PROGRAM=geo.heads_per_group // splits, HAS_RESET=has_reset,
                     IEEE=ieee, BT=geo.BT, BLOCK_P=geo.BLOCK_P, BLOCK_N=geo.BLOCK_N,
                     num_warps=BWD_WARPS, **stages)
        dB = torch.empty((splits, geo.batch, geo.L_pad, geo.groups, geo.N), **f32)
        dC = torch.empty_like(dB)
        _db_kernel[grid](x, C, dtp, cum, doc_arg, dcb, g_lp, dB, *per_group,
                         *_strides4(x), *_strides4(C), **tiles)
        _dc_kernel[grid](B, dy, cum, doc_arg, dcb, states_lp, dC, *per_group,
                         *_strides4(B), *_strides4(dy), **tiles)
        ddt = torch.empty(dt.shape, device=dev, dtype=dt.dtype)
        dA = torch.empty((geo.batch, geo.n_chunks, geo.heads), **f32)
        dbias = torch.empty_like(dA) if bias32 is not None else None
        _dt_bwd_kernel[(geo.n_chunks, geo.batch, triton.cdiv(geo.heads, geo.BLOCK_H))](
            dt, bias32 if bias32 is not None else dummy, A32, dtp, dcum, dpair, dend,
            ddt_direct, ddecay, ddt, dA, dbias if dbias is not None else dummy,
            geo.L, geo.heads, geo.chunk, geo.n_chunks, geo.L_pad, geo.n_sub, *dt.stride(),
            *ddt.stride(), dt_min, dt_max,
            HAS_BIAS=bias32 is not None, SOFTPLUS=softplus, CLAMP=clamp,
            BLOCK_CHUNK=geo.BLOCK_CHUNK, BLOCK_H=geo.BLOCK_H)
        dB = dB.sum(0)[:, :geo.L].to(B.dtype)
        dC = dC.sum(0)[:, :geo.L].to(C.dtype)
        if dD is not None:
            dD = dD.sum((0, 1))
            dD = (dD if D32.dim() == 2 else dD.sum(-1)).to(D_dtype)
        return (dx, ddt, dA.sum((0, 1)).to(A_dtype), dB, dC, dD,
                dbias.sum((0, 1)).to(bias_dtype) if dbias is not None else None,
                dh0.to(h0_dtype) if dh0 is not None else None,
                None, None, None, None, None)


def _document_counts(reset: torch.Tensor, chunk_size: int, L_pad: int) -> torch.Tensor:
    """(batch, L_pad) int32: the document starts in each chunk up to and including each
    position. Two positions of a chunk interact only if their counts agree, and the state
    entering the chunk reaches only count-0 positions."""
    batch, L = reset.shape
    padded = torch.zeros((batch, L_pad), dtype=torch.int32, device=reset.device)
    padded[:, :L] = reset
    return padded.view(batch, -1, chunk_size).cumsum(-1, dtype=torch.int32).view(batch, L_pad)


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    *,
    reset: torch.Tensor | None = None,
):
    """Drop-in for mamba_ssm's `mamba_chunk_scan_combined` (its positional order), with
    mamba-ft's keyword-only `reset`; semantics of `mamba_ft.ops.ssd_reference`. Returns y in
    x's dtype, and the final state (batch, heads, head_dim, N) fp32 when
    `return_final_states`."""
    reset = normalize_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                                 seq_idx, cu_seqlens, return_varlen_states, reset)
    L_pad = triton.cdiv(x.shape[1], chunk_size) * chunk_size
    doc = _document_counts(reset, chunk_size, L_pad) if reset is not None else None
    # With z the kernel's output stays fp32 until the gate, as in the reference.
    y, final = _SSDFunction.apply(x, dt, A, B, C, D, dt_bias, initial_states, doc, chunk_size,
                                  dt_softplus, tuple(dt_limit),
                                  torch.float32 if z is not None else x.dtype)
    if z is not None:
        y = (y * torch.nn.functional.silu(z.float())).to(x.dtype)
    return (y, final) if return_final_states else y
