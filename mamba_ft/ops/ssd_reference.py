"""Pure-PyTorch Mamba-2 SSD ops: the CPU path and the oracle future SSD kernels are tested against.

Layouts follow mamba_ssm's `mamba_chunk_scan_combined` (`mamba_ft.kernels.ssd_layout`):
  x, z: (batch, L, heads, head_dim)    dt: (batch, L, heads)    A, dt_bias: (heads,)
  B, C: (batch, L, groups, N)          D: (heads,) or (heads, head_dim)
  state: (batch, heads, head_dim, N) fp32

Per head h (group g = h // (heads / groups)) the recurrence is
  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t + D x_t,    y_t *= silu(z_t),
with dt = clamp(softplus(dt + dt_bias), dt_limit). The scalar decay per head is what makes
SSD a matrix-multiply algorithm: inside a chunk of T positions the outputs are
  y_t = sum_{s <= t} exp(a_{s+1} + ... + a_t) (C_t . B_s) dt_s x_s  +  exp(a_1 + ... + a_t) h_in C_t
(a_k = dt_k A), a (T, T) "attention" matrix per head plus the state entering the chunk, and the
state leaving the chunk is the same sum at t = T. Chunks are chained by their states.

Memory: the scan is an autograd Function whose forward keeps only the state entering each
chunk; its backward recomputes one chunk at a time from that state (autograd on the chunk's
own small graph) and chains the state gradients from the last chunk to the first. Saved memory
is O(batch * heads * head_dim * N * L / chunk) for states, and the working set is one chunk's
(batch, heads, T, T) matrices.

`reset` (batch, L) bool marks positions where a new document starts (packed sequences): the
state coming in from the previous position is dropped there, as in `mamba_ft.ops.reference`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mamba_ft.kernels.ssd_layout import normalize_ssd_inputs

_NO_LIMIT = (0.0, math.inf)


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """seg[..., t, s] = a[..., s+1] + ... + a[..., t] for s <= t (0 where s > t; callers mask).

    Summed term by term (a cumulative sum over a masked (T, T) matrix), not as a difference
    of two prefix sums: prefix sums grow to chunk * dt * |A| (hundreds for long chunks), and
    their difference would lose the small exponents' digits to cancellation.
    """
    T = a.shape[-1]
    later = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    terms = a.unsqueeze(-1).expand(*a.shape, T).masked_fill(~later, 0.0)  # [k, s] = a_k, k > s
    return terms.cumsum(dim=-2)


def _chunk(x, dt, A, B, C, h_in, reset):
    """One chunk of the SSD scan in fp32: (y (batch, T, heads, head_dim), state leaving it).

    x (b, T, h, p), dt (b, T, h) after bias/softplus/limits, A (h,), B and C (b, T, g, n),
    h_in (b, h, p, n), reset (b, T) bool or None.
    """
    b, T, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g  # heads per group; head index = group * k + j, as mamba_ssm and transformers
    a = (dt * A).transpose(1, 2)  # (b, h, T): log of each step's decay
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    if reset is None:
        same_doc, from_entry = causal, None
    else:
        # doc[t] counts the resets in [0, t]: positions s <= t interact only when no document
        # starts in (s, t], and the state entering the chunk reaches t only if none starts in
        # [0, t].
        doc = torch.cumsum(reset.long(), dim=1)
        same_doc = causal & (doc[:, :, None] == doc[:, None, :])
        same_doc = same_doc[:, None]  # (b, 1, T, T)
        from_entry = (doc == 0)[:, None, :]  # (b, 1, T)
    # Masked exponents are -inf before exp, so no inf * 0 appears in values or gradients.
    decay = torch.exp(_segment_sums(a).masked_fill(~same_doc, -math.inf))  # (b, h, T, T)
    entry = torch.cumsum(a, dim=-1)  # (b, h, T): decay from the chunk's entry to t
    if from_entry is not None:
        entry = entry.masked_fill(~from_entry, -math.inf)
    entry = torch.exp(entry)

    xdt = (x * dt.unsqueeze(-1)).view(b, T, g, k, p)
    scores = torch.einsum("btgn,bsgn->bgts", C, B)  # per group, shared by its heads
    weights = decay.view(b, g, k, T, T) * scores.unsqueeze(2)
    y = torch.einsum("bgjts,bsgjp->btgjp", weights, xdt)
    h_in_g = h_in.view(b, g, k, p, n)
    y = y + torch.einsum("btgn,bgjpn->btgjp", C, h_in_g) * entry.view(b, g, k, T).permute(
        0, 3, 1, 2).unsqueeze(-1)
    # The state leaving the chunk: every position's input decayed to the last position.
    to_last = decay[..., -1, :].view(b, g, k, T)
    h_out = torch.einsum("bgjs,bsgjp,bsgn->bgjpn", to_last, xdt, B)
    h_out = h_out + h_in_g * entry[..., -1].view(b, g, k, 1, 1)
    return y.reshape(b, T, h, p), h_out.reshape(b, h, p, n)


def _chunks(x, dt, A, B, C, initial_state, reset, chunk_size):
    """The chunks in order: the outputs (concatenated), the final state and the state entering
    each chunk."""
    state = initial_state
    entering, ys = [], []
    for start in range(0, x.shape[1], chunk_size):
        sl = slice(start, start + chunk_size)
        entering.append(state)
        y, state = _chunk(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], state,
                          None if reset is None else reset[:, sl])
        ys.append(y)
    return torch.cat(ys, dim=1), state, entering


class _ChunkedSSD(torch.autograd.Function):
    """The SSD scan without D, z or dt processing, all fp32 (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, reset, chunk_size):
        y, state, entering = _chunks(x, dt, A, B, C, initial_state, reset, chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, reset, *entering)
        ctx.chunk_size = chunk_size
        return y, state

    @staticmethod
    def backward(ctx, dy, dlast):
        x, dt, A, B, C, reset, *entering = ctx.saved_tensors
        T = ctx.chunk_size
        dx, ddt, dB, dC = (torch.empty_like(t) for t in (x, dt, B, C))
        dA = torch.zeros_like(A)
        # g carries dL/d(state) across chunk boundaries, from the last chunk backwards.
        g = dlast if dlast is not None else torch.zeros_like(entering[-1])
        for index in reversed(range(len(entering))):
            sl = slice(index * T, index * T + T)
            with torch.enable_grad():
                leaves = [t[:, sl].detach().requires_grad_() for t in (x, dt, B, C)]
                A_leaf = A.detach().requires_grad_()
                h_in = entering[index].detach().requires_grad_()
                y, h_out = _chunk(leaves[0], leaves[1], A_leaf, leaves[2], leaves[3], h_in,
                                  None if reset is None else reset[:, sl])
                grads = torch.autograd.grad((y, h_out), (*leaves, A_leaf, h_in),
                                            (dy[:, sl], g))
            dx[:, sl], ddt[:, sl], dB[:, sl], dC[:, sl] = grads[:4]
            dA += grads[4]
            g = grads[5]
        return dx, ddt, dA, dB, dC, g, None, None


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
    """The SSD scan y = SSD(A, B, C, dt)(x) (+ D x) (* silu(z)), state in fp32.

    mamba_ssm's positional order and layouts (`mamba_ft.kernels.ssd_layout`); documents as
    `seq_idx` or mamba-ft's keyword-only `reset`. As in mamba_ssm, `dt_limit` clamps dt only
    when it differs from (0, inf). Returns y in x's dtype, and the final state (batch, heads,
    head_dim, N) fp32 when `return_final_states`.
    """
    reset = normalize_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                                 seq_idx, cu_seqlens, return_varlen_states, reset)
    batch, _, heads, head_dim = x.shape
    out_dtype = x.dtype
    # The scan is fp32 by design: autocast must not move its einsums to bf16/fp16.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x32, dt32 = x.float(), dt.float()
        if dt_bias is not None:
            dt32 = dt32 + dt_bias.float()
        if dt_softplus:
            dt32 = F.softplus(dt32)
        if tuple(dt_limit) != _NO_LIMIT:
            dt32 = dt32.clamp(min=dt_limit[0], max=dt_limit[1])
        state = (initial_states.float() if initial_states is not None
                 else x32.new_zeros(batch, heads, head_dim, B.shape[-1]))
        args = (x32, dt32, A.float(), B.float(), C.float(), state, reset, chunk_size)
        if torch.compiler.is_compiling():
            # The eager backward recomputes each chunk through torch.autograd.grad, where Dynamo
            # breaks the graph; traced, autograd differentiates the chunks directly.
            y, state, _ = _chunks(*args)
        else:
            y, state = _ChunkedSSD.apply(*args)
        if D is not None:
            D32 = D.float()
            y = y + x32 * (D32[:, None] if D32.dim() == 1 else D32)
        if z is not None:
            y = y * F.silu(z.float())
    y = y.to(out_dtype)
    return (y, state) if return_final_states else y


def ssd_state_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. x, z: (batch, heads, head_dim); dt: (batch, heads); A, dt_bias:
    (heads,); B, C: (batch, groups, N); state (batch, heads, head_dim, N) fp32.

    Returns (y (batch, heads, head_dim) in x's dtype, new state). The same dt processing as the
    chunked scan, `dt_limit` included, so a cached step equals the full forward. Nothing is
    updated in place, so the step stays differentiable, and the caller stores the new state,
    unless `out` is given: then the new state is written into it (it may be `state` itself).
    """
    batch, heads, head_dim = x.shape
    groups = B.shape[1]
    with torch.autocast(device_type=x.device.type, enabled=False):  # the state stays fp32
        dt32 = dt.float()
        if dt_bias is not None:
            dt32 = dt32 + dt_bias.float()
        if dt_softplus:
            dt32 = F.softplus(dt32)
        if tuple(dt_limit) != _NO_LIMIT:
            dt32 = dt32.clamp(min=dt_limit[0], max=dt_limit[1])
        # Each group's B and C serve heads / groups consecutive heads.
        B_h = B.float().repeat_interleave(heads // groups, dim=1)  # (b, h, n)
        C_h = C.float().repeat_interleave(heads // groups, dim=1)
        x32 = x.float()
        decay = torch.exp(dt32 * A.float())[..., None, None]
        new_state = decay * state.float() + (dt32[..., None] * x32).unsqueeze(-1) * B_h.unsqueeze(2)
        y = torch.einsum("bhpn,bhn->bhp", new_state, C_h)
        if D is not None:
            D32 = D.float()
            y = y + x32 * (D32[:, None] if D32.dim() == 1 else D32)
        if z is not None:
            y = y * F.silu(z.float())
    if out is not None:
        new_state = out.copy_(new_state)
    return y.to(x.dtype), new_state
