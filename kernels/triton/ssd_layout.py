"""The SSD (Mamba-2) chunked scan's calling convention, shared by the reference and the kernels.

Both take mamba_ssm's `mamba_chunk_scan_combined` positional order, `(x, dt, A, B, C,
chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_limit,
return_final_states, return_varlen_states)`, with mamba-ft's addition (`reset`) keyword-only,
so a call written for mamba_ssm means the same thing here (as `scan_layout.py` does for the
Mamba-1 scan). This module checks the layouts before any work starts, so a wrong shape fails
with a message naming the argument, not deep inside a chunk loop or a Triton launch. Plain
torch only, so the reference imports it without Triton.
"""

from __future__ import annotations

import torch


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def _fail(message: str):
    raise ValueError(f"mamba_chunk_scan_combined: {message}")


def normalize_ssd_inputs(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                         initial_states=None, seq_idx=None, cu_seqlens=None,
                         return_varlen_states=False, reset=None):
    """Check every layout; return the document-start mask (batch, L) bool, or None.

    Layouts: x, z (batch, L, heads, head_dim); dt (batch, L, heads); A (heads,) real; B, C
    (batch, L, groups, N) with heads a multiple of groups (head i reads group i // (heads /
    groups)); D (heads,) or (heads, head_dim); dt_bias (heads,); initial_states (batch, heads,
    head_dim, N). Documents: mamba_ssm's `seq_idx` (batch, L) integer ids, or mamba-ft's
    `reset` (batch, L) bool marking each document's first position; `seq_idx` is converted to
    `reset` (a document starts wherever the id changes). Raises ValueError naming the argument.
    """
    if x.dim() != 4:
        _fail(f"x must be (batch, L, heads, head_dim), got {_describe(x)}.")
    batch, length, heads, head_dim = x.shape
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        _fail(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if tuple(dt.shape) != (batch, length, heads):
        _fail(f"dt must be (batch, L, heads) = {(batch, length, heads)}, got {_describe(dt)}.")
    if A.is_complex() or tuple(A.shape) != (heads,):
        _fail(f"A must be real of shape (heads,) = ({heads},), got {_describe(A)} {A.dtype}.")
    if B.dim() != 4 or B.shape[:2] != (batch, length):
        _fail(f"B must be (batch, L, groups, N) with (batch, L) = {(batch, length)}, got "
              f"{_describe(B)}.")
    groups, state_size = B.shape[2], B.shape[3]
    if tuple(C.shape) != tuple(B.shape):
        _fail(f"C must have B's shape {tuple(B.shape)}, got {_describe(C)}.")
    if heads % groups:
        _fail(f"heads ({heads}) must be a multiple of groups ({groups}).")
    if z is not None and tuple(z.shape) != tuple(x.shape):
        _fail(f"z must have x's shape {tuple(x.shape)}, got {_describe(z)}.")
    if D is not None and tuple(D.shape) not in ((heads,), (heads, head_dim)):
        _fail(f"D must be (heads,) or (heads, head_dim) = ({heads},) or {(heads, head_dim)}, got "
              f"{_describe(D)}.")
    if dt_bias is not None and tuple(dt_bias.shape) != (heads,):
        _fail(f"dt_bias must be (heads,) = ({heads},), got {_describe(dt_bias)}.")
    if initial_states is not None and tuple(initial_states.shape) != (batch, heads, head_dim,
                                                                      state_size):
        _fail(f"initial_states must be (batch, heads, head_dim, N) = "
              f"{(batch, heads, head_dim, state_size)}, got {_describe(initial_states)}.")
    if cu_seqlens is not None or return_varlen_states:
        # mamba_ssm's varlen mode returns one state per sequence; mamba-ft has no use for it
        # yet and must not pretend to honour it.
        _fail("cu_seqlens / return_varlen_states are not supported; mark documents with "
              "seq_idx or reset (batch, L) instead.")
    if seq_idx is not None and reset is not None:
        _fail("got both seq_idx and reset; pass one document marking.")
    if seq_idx is not None:
        if tuple(seq_idx.shape) != (batch, length) or seq_idx.is_floating_point() \
                or seq_idx.dtype == torch.bool:
            _fail(f"seq_idx must be an integer tensor of shape (batch, L) = {(batch, length)}, "
                  f"got {_describe(seq_idx)} {seq_idx.dtype}.")
        reset = torch.zeros(batch, length, dtype=torch.bool, device=seq_idx.device)
        reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    if reset is not None and (tuple(reset.shape) != (batch, length) or reset.dtype != torch.bool):
        _fail(f"reset must be a bool tensor of shape (batch, L) = {(batch, length)}, got "
              f"{_describe(reset)} {reset.dtype}.")
    return reset
