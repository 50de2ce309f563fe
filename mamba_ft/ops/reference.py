"""Pure-PyTorch Mamba-1 ops and the norms (RMSNorm, Mamba-2's gated RMSNorm): the CPU path and
the oracle the Triton kernels are tested against (Mamba-2's SSD scan is `ssd_reference`).

Layouts follow mamba_ssm so the two are interchangeable:
  u, delta, z: (batch, d, L)     A: (d, N) fp32     B, C: (batch, N, L)     D, delta_bias: (d,)
  state: (batch, d, N) fp32      conv weight: (d, width)    conv state: (batch, d, width - 1)

The selective scan runs over the sequence in chunks. Within a chunk the recurrence
h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t is stepped one position at a time on
(batch, d, N) tensors; only one chunk's (chunk, batch, d, N) tensors exist at once. The scan
is an autograd Function whose forward keeps only the state entering each chunk and whose
backward recomputes a chunk from it, so saved memory is O(batch * d * N * L / chunk), not
O(batch * d * N * L), and no per-step autograd graph is built.

`reset` (batch, L) bool marks positions where a new document starts (packed sequences): the
state coming in from the previous position is dropped there, and the causal conv does not
look back across it, so documents packed into one row never see each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_ft.kernels.scan_layout import normalize_scan_inputs

# A 16-step chunk keeps one chunk's (chunk, batch, d, N) tensors in a CPU's cache: the fastest
# of 16 / 32 / 64 / 128 measured for d=1536, N=16, L=512.
DEFAULT_CHUNK = 16


def _chunk_states(decay, drive, keep, state):
    """Step h_t = decay_t * keep_t * h_{t-1} + drive_t through one chunk, time-major.

    decay, drive: (T, batch, d, N); keep: (T, batch) or None. Returns all T states (T, batch,
    d, N). The loop runs on (batch, d, N) slices: work-optimal, and on a CPU faster than a
    parallel (log-depth) scan, which does log2(T) times the arithmetic.
    """
    states = torch.empty_like(drive)
    for t in range(drive.shape[0]):
        if keep is not None:
            state = state * keep[t, :, None, None]
        state = _into(states[t], torch.addcmul, drive[t], decay[t], state)
    return states


def _into(out, op, *args):
    """op(*args) written into `out`, a slice of a preallocated tensor, and returned. Eagerly
    with `out=` (no temporary); while torch.compile traces, as the op and a copy, since Dynamo
    breaks the graph at an `out=` into a slice (once per step)."""
    if torch.compiler.is_compiling():
        value = op(*args)
        out.copy_(value)
        return value
    return op(*args, out=out)


def _discretize(u, delta, A, B):
    """decay = exp(delta * A) and drive = delta * u * B, time-major (T, batch, d, N)."""
    delta_t = delta.permute(2, 0, 1).unsqueeze(-1)  # (T, b, d, 1)
    decay = torch.exp(delta_t * A)
    drive = (delta_t * u.permute(2, 0, 1).unsqueeze(-1)) * B.permute(2, 0, 1).unsqueeze(2)
    return decay, drive


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, all fp32.

    The forward keeps only the state entering each chunk; the backward recomputes a chunk's
    states from it and runs the adjoint recurrence g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}
    backwards through the chunk. Saved memory is O(batch * d * N * L / chunk).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, initial_state, keep, chunk_size):
        length = u.shape[-1]
        state = initial_state
        entering, ys = [], []
        for start in range(0, length, chunk_size):
            sl = slice(start, start + chunk_size)
            entering.append(state)
            decay, drive = _discretize(u[..., sl], delta[..., sl], A, B[..., sl])
            states = _chunk_states(decay, drive, None if keep is None else keep[sl], state)
            ys.append(torch.einsum("tbdn,bnt->bdt", states, C[..., sl]))
            # A copy, not a view: a view would keep the whole chunk's states alive.
            state = states[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, keep, *entering)
        ctx.chunk_size = chunk_size
        y = torch.cat(ys, dim=-1) if ys else u.new_zeros(u.shape)
        return y, state

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, keep, *entering = ctx.saved_tensors
        T = ctx.chunk_size
        dy = dy.float()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        # g carries dL/dh across chunk boundaries, from the last position backwards.
        g_next = dlast.float().clone() if dlast is not None else torch.zeros_like(entering[0])
        decay_next = None  # decay (times keep) of the first position of the chunk after
        for index in reversed(range(len(entering))):
            sl = slice(index * T, index * T + T)
            keep_c = None if keep is None else keep[sl]
            decay, drive = _discretize(u[..., sl], delta[..., sl], A, B[..., sl])
            states = _chunk_states(decay, drive, keep_c, entering[index])
            eff_decay = decay if keep_c is None else decay * keep_c[:, :, None, None]
            # prev[t] = h_{t-1} as the recurrence saw it (after the reset mask).
            prev = torch.cat([entering[index].unsqueeze(0), states[:-1]], dim=0)
            if keep_c is not None:
                prev = prev * keep_c[:, :, None, None]
            local = torch.einsum("bdt,bnt->tbdn", dy[..., sl], C[..., sl])
            g = torch.empty_like(states)
            for t in reversed(range(states.shape[0])):
                carried = g_next if decay_next is None else decay_next * g_next
                g_next = _into(g[t], torch.add, local[t], carried)
                decay_next = eff_decay[t]
            dC[..., sl] = torch.einsum("tbdn,bdt->bnt", states, dy[..., sl])
            g_prev = g * prev * decay  # dL/d(delta_t * A) through the decay
            delta_c = delta[..., sl].permute(2, 0, 1)  # (T, b, d)
            u_c = u[..., sl].permute(2, 0, 1)
            B_c = B[..., sl].permute(2, 0, 1).unsqueeze(2)  # (T, b, 1, N)
            g_B = (g * B_c).sum(-1)  # (T, b, d)
            ddelta[..., sl] = ((g_prev * A).sum(-1) + g_B * u_c).permute(1, 2, 0)
            du[..., sl] = (g_B * delta_c).permute(1, 2, 0)
            dB[..., sl] = torch.einsum("tbdn,tbd->bnt", g, delta_c * u_c)
            dA += torch.einsum("tbdn,tbd->dn", g_prev, delta_c)
        dh0 = decay_next * g_next if decay_next is not None else g_next
        return du, ddelta, dA, dB, dC, dh0, None, None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
):
    """Selective scan y = SSM(A, B, C, delta)(u) (+ D * u) (* silu(z)), state in fp32.

    mamba_ssm's positional order and layouts (`mamba_ft.kernels.scan_layout`). Returns y in
    u's dtype, and the final state (batch, d, N) fp32 when `return_last_state`.
    """
    B, C = normalize_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    out_dtype = u.dtype
    batch, d, length = u.shape
    u32, delta32 = u.float(), delta.float()
    if delta_bias is not None:
        delta32 = delta32 + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta32 = F.softplus(delta32)
    A32, B32, C32 = A.float(), B.float(), C.float()
    state = (
        initial_state.float()
        if initial_state is not None
        else u32.new_zeros(batch, d, A.shape[-1])
    )
    # Time-major keep mask: 0 where a document starts (the incoming state is dropped).
    keep = (~reset).float().t().contiguous() if reset is not None else None
    # The recurrence is fp32 by design: autocast must not move its einsums to bf16/fp16.
    with torch.autocast(device_type=u.device.type, enabled=False):
        y, state = _ChunkedScan.apply(u32, delta32, A32, B32, C32, state, keep, chunk_size)
        if D is not None:
            y = y + u32 * D.float()[None, :, None]
        if z is not None:
            y = y * F.silu(z.float())
    y = y.to(out_dtype)
    return (y, state) if return_last_state else y


def selective_state_step(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. u, delta, z: (batch, d); B, C: (batch, N); state (batch, d, N) fp32.

    Returns (y (batch, d) in u's dtype, new state). The caller stores the new state; nothing is
    updated in place, so the step stays differentiable, unless `out` is given: then the new
    state is written into it (it may be `state` itself) and returned.
    """
    delta32 = delta.float()
    if delta_bias is not None:
        delta32 = delta32 + delta_bias.float()
    if delta_softplus:
        delta32 = F.softplus(delta32)
    decay = torch.exp(delta32.unsqueeze(-1) * A.float())
    drive = (delta32 * u.float()).unsqueeze(-1) * B.float().unsqueeze(1)
    new_state = decay * state.float() + drive
    with torch.autocast(device_type=u.device.type, enabled=False):  # the state stays fp32
        y = torch.einsum("bdn,bn->bd", new_state, C.float())
    if D is not None:
        y = y + u.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    if out is not None:
        new_state = out.copy_(new_state)
    return y.to(u.dtype), new_state


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    activation: str | None = "silu",
    return_final_state: bool = False,
):
    """Causal depthwise conv over (batch, d, L) with weight (d, width).

    `initial_state` (batch, d, width - 1) holds the inputs preceding x (zeros when None).
    `reset` (batch, L) bool: a document starts there, so no tap reaches back across it.
    Returns y (batch, d, L) and, when asked, the last width - 1 inputs (the next conv state).
    """
    batch, d, length = x.shape
    width = weight.shape[-1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, d, width - 1)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=-1)
    if reset is None:
        y = F.conv1d(padded, weight.unsqueeze(1).to(x.dtype), None, groups=d)
    else:
        # Tap k reads position t - k; it is valid only if no document starts in (t - k, t].
        # doc_id counts the resets up to each position, so tap k is valid where the
        # document id at t - k equals the one at t.
        doc = torch.cumsum(reset.long(), dim=-1)
        doc = torch.cat([doc.new_zeros(batch, width - 1), doc], dim=-1)
        y = x.new_zeros(batch, d, length)
        for k in range(width):
            src = padded[..., width - 1 - k : width - 1 - k + length]
            same = (doc[:, width - 1 - k : width - 1 - k + length] == doc[:, width - 1 :])
            y = y + src * weight[:, width - 1 - k].to(x.dtype)[None, :, None] * same[:, None, :]
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None]
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    if return_final_state:
        return y, padded[..., -(width - 1):] if width > 1 else padded[..., :0]
    return y


def causal_conv1d_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of the causal conv. x: (batch, d); conv_state: (batch, d, width - 1).

    Returns (y (batch, d), new conv state); nothing is updated in place.
    """
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    return y, window[..., 1:]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' MambaRMSNorm: fp32 statistics, normalised input cast back, then weight."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   group_size: int, norm_before_gate: bool = False) -> torch.Tensor:
    """weight * RMSNorm_per_group(x * silu(gate)), statistics in fp32. x, gate: (..., d).

    `norm_before_gate` (Falcon-H1's option): (weight * RMSNorm_per_group(x)) * silu(gate),
    weight and gate applied in fp32 before the cast back, as transformers' FalconH1 computes it.
    """
    input_dtype = x.dtype
    h = x.float()
    if gate is not None and not norm_before_gate:
        h = h * F.silu(gate.float())
    *prefix, d = h.shape
    grouped = h.view(*prefix, d // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    if norm_before_gate:
        out = weight.float() * grouped.view(*prefix, d)
        return (out if gate is None else out * F.silu(gate.float())).to(input_dtype)
    return weight * grouped.view(*prefix, d).to(input_dtype)
