"""Selective scan (Mamba-1 S6) in Triton: chunked forward and backward, state in fp32.

Semantics are exactly `mamba_ft.reference.selective_scan` (mamba_ssm's layouts):
  u, delta, z: (batch, d, L)   A: (d, N) fp32   B, C: (batch, N, L)   D, delta_bias: (d,)
  initial_state / last state: (batch, d, N) fp32   reset: (batch, L) bool document starts.
Any strides are accepted (the mixer passes (batch, L, d)-major views).

Design (one program per (batch row, tile of BLOCK_D channels)):
- The program walks the sequence in chunks of BLOCK_T positions. A chunk is a register tile
  [BLOCK_T, BLOCK_D, N]: decay a = exp2(delta * A * log2 e) (0 where a document starts) and
  drive x = delta * u * B, combined by one first-order `tl.associative_scan` along time; the
  carry state entering the chunk is folded in afterwards (h_t = prod(a) * h_in + scan(x)).
  With BLOCK_D * N = 32 * num_warps each thread owns one (channel, state) pair and the whole
  time axis, so the scan is a sequential loop inside the thread. B and C are loaded once per
  tile and shared by its BLOCK_D channels; delta_bias, softplus, D and the z gate are fused.
- The forward writes the state entering each chunk (fp32, (batch, n_chunks, d, N)); that is
  all the backward keeps besides the inputs: saved memory O(batch * d * N * L / BLOCK_T).
- The backward walks the chunks in reverse: it recomputes the chunk's states from its
  checkpoint, runs the adjoint as a reverse scan dh_t = C_t dy_t + a_{t+1} dh_{t+1} (the
  shifted decay a_{t+1} is recomputed from delta at t+1 rather than shifted in registers),
  and uses a_t h_{t-1} = h_t - x_t so no shifted state is needed either. dB and dC are
  reduced over the channel tile in registers and added with one fp32 atomic per tile;
  dA, dD and d(delta_bias) are written per batch row and summed by torch (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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
def _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t, mask,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta for a [BLOCK_T, BLOCK_D] tile, with bias and softplus; 0 outside the mask."""
    raw = tl.load(dt_ptr + offs_d[None, :] * s_dt_d + offs_t[:, None] * s_dt_l,
                  mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, h0_ptr,
    y_ptr, ckpt_ptr, last_ptr,
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
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < d
    mn = offs_n < N
    mdn = md[:, None] & mn[None, :]
    A2 = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mdn, other=0.0) * LOG2E
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0)
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + b * d * N + state_offs, mask=mdn, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    u_ptr += b * s_u_b
    dt_ptr += b * s_dt_b
    B_ptr += b * s_B_b
    C_ptr += b * s_C_b
    z_ptr += b * s_z_b
    y_ptr += b * s_y_b
    reset_ptr += b * s_r_b
    is_last_t = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None, None]
    for c in range(n_chunks):
        if STORE_CKPT:
            tl.store(ckpt_ptr + ((b * n_chunks + c) * d) * N + state_offs, h, mask=mdn)
        offs_t = c * BLOCK_T + tl.arange(0, BLOCK_T)
        mt = offs_t < L
        mdt = mt[:, None] & md[None, :]
        u = tl.load(u_ptr + offs_d[None, :] * s_u_d + offs_t[:, None] * s_u_l,
                    mask=mdt, other=0.0).to(tl.float32)
        dt, _ = _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t, mdt, HAS_BIAS, SOFTPLUS)
        mtn = mt[:, None] & mn[None, :]
        Bt = tl.load(B_ptr + offs_n[None, :] * s_B_n + offs_t[:, None] * s_B_l,
                     mask=mtn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + offs_n[None, :] * s_C_n + offs_t[:, None] * s_C_l,
                     mask=mtn, other=0.0).to(tl.float32)
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])
        if HAS_RESET:
            r = tl.load(reset_ptr + offs_t * s_r_l, mask=mt, other=0)
            a = tl.where((r != 0)[:, None, None], 0.0, a)
        x = (dt * u)[:, :, None] * Bt[:, None, :]
        aS, hS = tl.associative_scan((a, x), axis=0, combine_fn=_first_order)
        hS = hS + aS * h[None, :, :]
        y = tl.sum(hS * Ct[:, None, :], axis=2)
        h = tl.sum(tl.where(is_last_t, hS, 0.0), axis=0)
        if HAS_D:
            y = y + Dv[None, :] * u
        if HAS_Z:
            z = tl.load(z_ptr + offs_d[None, :] * s_z_d + offs_t[:, None] * s_z_l,
                        mask=mdt, other=0.0).to(tl.float32)
            y = y * z * _sigmoid(z)
        tl.store(y_ptr + offs_d[None, :] * s_y_d + offs_t[:, None] * s_y_l,
                 y.to(y_ptr.dtype.element_ty), mask=mdt)
    if STORE_LAST:
        tl.store(last_ptr + b * d * N + state_offs, h, mask=mdn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, reset_ptr, ckpt_ptr,
    dout_ptr, dlast_ptr,
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
    SOFTPLUS: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DLAST: tl.constexpr,
    NEED_DH0: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Gradient outputs du, ddt, dz are contiguous (batch, d, L); dB, dC are fp32 (batch, N, L)
    # zero-filled buffers; dA (batch, d, N), dD and dbias (batch, d) are per-row partials.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < d
    mn = offs_n < N
    mdn = md[:, None] & mn[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mdn, other=0.0)
    A2 = A * LOG2E
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0)
    state_offs = offs_d[:, None] * N + offs_n[None, :]
    if HAS_DLAST:
        dh_carry = tl.load(dlast_ptr + b * d * N + state_offs, mask=mdn, other=0.0)
    else:
        dh_carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    u_ptr += b * s_u_b
    dt_ptr += b * s_dt_b
    B_ptr += b * s_B_b
    C_ptr += b * s_C_b
    z_ptr += b * s_z_b
    dout_ptr += b * s_o_b
    reset_ptr += b * s_r_b
    grad_base = b * d * L
    dBC_base = b * N * L
    is_first_t = (tl.arange(0, BLOCK_T) == 0)[:, None, None]
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        h0 = tl.load(ckpt_ptr + ((b * n_chunks + c) * d) * N + state_offs, mask=mdn, other=0.0)
        offs_t = c * BLOCK_T + tl.arange(0, BLOCK_T)
        mt = offs_t < L
        mdt = mt[:, None] & md[None, :]
        u = tl.load(u_ptr + offs_d[None, :] * s_u_d + offs_t[:, None] * s_u_l,
                    mask=mdt, other=0.0).to(tl.float32)
        dt, dt_pre = _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t, mdt,
                                 HAS_BIAS, SOFTPLUS)
        mtn = mt[:, None] & mn[None, :]
        Bt = tl.load(B_ptr + offs_n[None, :] * s_B_n + offs_t[:, None] * s_B_l,
                     mask=mtn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + offs_n[None, :] * s_C_n + offs_t[:, None] * s_C_l,
                     mask=mtn, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offs_d[None, :] * s_o_d + offs_t[:, None] * s_o_l,
                       mask=mdt, other=0.0).to(tl.float32)
        # Recompute this chunk's states from its checkpoint.
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])
        if HAS_RESET:
            r = tl.load(reset_ptr + offs_t * s_r_l, mask=mt, other=0)
            a = tl.where((r != 0)[:, None, None], 0.0, a)
        dtu = dt * u
        x = dtu[:, :, None] * Bt[:, None, :]
        aS, hS = tl.associative_scan((a, x), axis=0, combine_fn=_first_order)
        hS = hS + aS * h0[None, :, :]
        # Output gate.
        dy = dout
        if HAS_Z:
            z = tl.load(z_ptr + offs_d[None, :] * s_z_d + offs_t[:, None] * s_z_l,
                        mask=mdt, other=0.0).to(tl.float32)
            sz = _sigmoid(z)
            pre_gate = tl.sum(hS * Ct[:, None, :], axis=2) + Dv[None, :] * u
            dz = dout * pre_gate * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + grad_base + offs_d[None, :] * L + offs_t[:, None], dz, mask=mdt)
            dy = dout * z * sz
        dy = tl.where(mdt, dy, 0.0)
        # Adjoint: dh_t = C_t dy_t + a_{t+1} dh_{t+1}, with a_{t+1} recomputed from delta at t+1.
        # Past the end of the sequence the coefficient is 1, so the carry (the gradient of the
        # last state) reaches position L - 1 unchanged.
        offs_t1 = offs_t + 1
        mt1 = offs_t1 < L
        dt1, _ = _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t1,
                             mt1[:, None] & md[None, :], HAS_BIAS, SOFTPLUS)
        a1 = tl.exp2(dt1[:, :, None] * A2[None, :, :])
        if HAS_RESET:
            r1 = tl.load(reset_ptr + offs_t1 * s_r_l, mask=mt1, other=0)
            a1 = tl.where((r1 != 0)[:, None, None], 0.0, a1)
        a1 = tl.where(mt1[:, None, None], a1, 1.0)
        rhs = dy[:, :, None] * Ct[:, None, :]
        gS, dhS = tl.associative_scan((a1, rhs), axis=0, combine_fn=_first_order, reverse=True)
        dh = dhS + gS * dh_carry[None, :, :]
        dh_carry = tl.sum(tl.where(is_first_t, dh, 0.0), axis=0)
        # a_t h_{t-1} (with the reset applied), without shifting the states.
        ah_prev = hS - x
        dC = tl.sum(dy[:, :, None] * hS, axis=1)
        dB = tl.sum(dh * dtu[:, :, None], axis=1)
        bc_offs = dBC_base + offs_n[None, :] * L + offs_t[:, None]
        tl.atomic_add(dC_ptr + bc_offs, dC, mask=mtn)
        tl.atomic_add(dB_ptr + bc_offs, dB, mask=mtn)
        dhB = tl.sum(dh * Bt[:, None, :], axis=2)
        dh_ah = dh * ah_prev
        du = dhB * dt
        if HAS_D:
            du = du + Dv[None, :] * dy
            dD_acc += tl.sum(dy * u, axis=0)
        ddt = dhB * u + tl.sum(dh_ah * A[None, :, :], axis=2)
        dA_acc += tl.sum(dh_ah * dt[:, :, None], axis=0)
        if SOFTPLUS:
            ddt = ddt * _sigmoid(dt_pre)
        ddt = tl.where(mdt, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=0)
        tl.store(du_ptr + grad_base + offs_d[None, :] * L + offs_t[:, None], du, mask=mdt)
        tl.store(ddt_ptr + grad_base + offs_d[None, :] * L + offs_t[:, None], ddt, mask=mdt)
    tl.store(dA_ptr + b * d * N + state_offs, dA_acc, mask=mdn)
    tl.store(dD_ptr + b * d + offs_d, dD_acc, mask=md)
    tl.store(dbias_ptr + b * d + offs_d, dbias_acc, mask=md)
    if NEED_DH0:
        # h_0 = a_0 h_init + x_0, so d h_init = a_0 dh_0 (a_0 is 0 where a document starts).
        offs_t0 = tl.arange(0, 1)
        dt0, _ = _load_delta(dt_ptr, s_dt_d, s_dt_l, bias, offs_d, offs_t0,
                             (offs_t0 < L)[:, None] & md[None, :], HAS_BIAS, SOFTPLUS)
        a0 = tl.exp2(tl.sum(dt0, axis=0)[:, None] * A2)
        if HAS_RESET:
            r0 = tl.sum(tl.load(reset_ptr + offs_t0 * s_r_l).to(tl.int32), axis=0)
            a0 = tl.where(r0 != 0, 0.0, a0)
        tl.store(dh0_ptr + b * d * N + state_offs, a0 * dh_carry, mask=mdn)


def _tile_sizes(n_state: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_N, BLOCK_D, num_warps).

    BLOCK_D * BLOCK_N = 32 * num_warps: every thread then owns one (channel, state) pair and
    the whole time axis of the tile, so the scan along time runs inside a thread. Chunk 32,
    8 channels, 4 warps was the fastest of the shapes timed on an H100 (docs/benchmarks.md).
    """
    block_n = triton.next_power_of_2(n_state)
    warps = 4
    block_d = max(1, 32 * warps // block_n)
    return 32, block_n, block_d, warps


def _strides3(t: torch.Tensor | None):
    return (0, 0, 0) if t is None else tuple(t.stride())


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset,
                return_last_state):
        batch, d, L = u.shape
        N = A.shape[1]
        chunk, block_n, block_d, warps = _tile_sizes(N)
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
        dummy = A
        grid = (triton.cdiv(d, block_d), batch)
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            reset_u8 if reset_u8 is not None else dummy,
            initial_state if initial_state is not None else dummy,
            y, ckpt if ckpt is not None else dummy, last if last is not None else dummy,
            d, L, N, n_chunks,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides3(z), *y.stride(),
            *(reset_u8.stride() if reset_u8 is not None else (0, 0)),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), HAS_RESET=reset is not None,
            HAS_H0=initial_state is not None, STORE_CKPT=needs_grad,
            STORE_LAST=bool(return_last_state),
            BLOCK_D=block_d, BLOCK_T=chunk, BLOCK_N=block_n, num_warps=warps,
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
        f32 = dict(device=u.device, dtype=torch.float32)
        du = torch.empty((batch, d, L), **f32)
        ddt = torch.empty((batch, d, L), **f32)
        dz = torch.empty((batch, d, L), **f32) if z is not None else None
        dB = torch.zeros((batch, N, L), **f32)
        dC = torch.zeros((batch, N, L), **f32)
        dA = torch.empty((batch, d, N), **f32)
        dD = torch.empty((batch, d), **f32)
        dbias = torch.empty((batch, d), **f32)
        dh0 = torch.empty((batch, d, N), **f32) if ctx.has_h0 else None
        if dlast is not None:
            dlast = dlast.float().contiguous()
        dummy = A
        chunk, block_n, block_d, warps = _tile_sizes(N)
        _scan_bwd_kernel[(triton.cdiv(d, block_d), batch)](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            reset_u8 if reset_u8 is not None else dummy, ckpt,
            dout, dlast if dlast is not None else dummy,
            du, ddt, dA, dB, dC, dD, dz if dz is not None else dummy, dbias,
            dh0 if dh0 is not None else dummy,
            d, L, N, n_chunks,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides3(z),
            *dout.stride(), *(reset_u8.stride() if reset_u8 is not None else (0, 0)),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, HAS_RESET=reset_u8 is not None,
            HAS_DLAST=dlast is not None, NEED_DH0=ctx.has_h0,
            BLOCK_D=block_d, BLOCK_T=chunk, BLOCK_N=block_n, num_warps=warps,
        )
        u_dt, dt_dt, B_dt, C_dt, z_dt = ctx.dtypes
        return (
            du.to(u_dt), ddt.to(dt_dt), dA.sum(0), dB.to(B_dt), dC.to(C_dt),
            dD.sum(0) if D is not None else None,
            dz.to(z_dt) if dz is not None else None,
            dbias.sum(0) if delta_bias is not None else None,
            None, dh0, None, None,
        )


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      initial_state=None, reset=None, return_last_state=False):
    """Drop-in for `mamba_ft.reference.selective_scan` (and mamba_ssm's `selective_scan_fn`)."""
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 initial_state, reset, return_last_state)
