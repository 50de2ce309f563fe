"""Pure-PyTorch Mamba-1 ops: the CPU path and the oracle the Triton kernels are tested against.

Layouts follow mamba_ssm so the two are interchangeable:
  u, delta, z: (batch, d, L)     A: (d, N) fp32     B, C: (batch, N, L)     D, delta_bias: (d,)
  state: (batch, d, N) fp32      conv weight: (d, width)    conv state: (batch, d, width - 1)

The selective scan runs over the sequence in chunks. Within a chunk the recurrence
h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t is stepped one position at a time on
(batch, d, N) tensors; only one chunk's (batch, d, chunk, N) tensors exist at once. Under
autograd each chunk is checkpointed, so the backward keeps only the state entering each chunk
and recomputes the rest: saved memory is O(batch * d * N * L / chunk), not O(batch * d * N * L).

`reset` (batch, L) bool marks positions where a new document starts (packed sequences): the
state coming in from the previous position is dropped there, and the causal conv does not
look back across it, so documents packed into one row never see each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 64


def _scan_chunk(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the recurrence, all fp32. Returns y (batch, d, T) and the last state."""
    # (batch, d, T, N): the only four-dimensional tensors, one chunk long.
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])
    drive = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    states = []
    for t in range(u.shape[-1]):
        if keep is not None:
            state = state * keep[:, t, None, None]
        state = torch.addcmul(drive[:, :, t], decay[:, :, t], state)
        states.append(state)
    y = torch.einsum("bdtn,bnt->bdt", torch.stack(states, dim=2), C)
    return y, state


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
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    return_last_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
):
    """Selective scan y = SSM(A, B, C, delta)(u) (+ D * u) (* silu(z)), state in fp32.

    Returns y in u's dtype, and the final state (batch, d, N) fp32 when `return_last_state`.
    """
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
    keep = (~reset).float() if reset is not None else None
    use_checkpoint = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state)
    )
    ys = []
    for start in range(0, length, chunk_size):
        sl = slice(start, start + chunk_size)
        args = (u32[..., sl], delta32[..., sl], A32, B32[..., sl], C32[..., sl], state,
                keep[:, sl] if keep is not None else None)
        if use_checkpoint:
            y, state = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, state = _scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1) if ys else u32.new_zeros(batch, d, 0)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step. u, delta, z: (batch, d); B, C: (batch, N); state (batch, d, N) fp32.

    Returns (y (batch, d) in u's dtype, new state). The caller stores the new state; nothing is
    updated in place so the step stays differentiable.
    """
    delta32 = delta.float()
    if delta_bias is not None:
        delta32 = delta32 + delta_bias.float()
    if delta_softplus:
        delta32 = F.softplus(delta32)
    decay = torch.exp(delta32.unsqueeze(-1) * A.float())
    drive = (delta32 * u.float()).unsqueeze(-1) * B.float().unsqueeze(1)
    new_state = decay * state.float() + drive
    y = torch.einsum("bdn,bn->bd", new_state, C.float())
    if D is not None:
        y = y + u.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
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
