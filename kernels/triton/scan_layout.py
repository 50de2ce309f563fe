"""The selective scan's calling convention, shared by the kernel and the reference.

Both take mamba_ssm's `selective_scan_fn` positional order, `(u, delta, A, B, C, D, z,
delta_bias, delta_softplus, return_last_state)`, with mamba-ft's additions (`initial_state`,
`reset`) keyword-only, so a call written for mamba_ssm means the same thing here. This module
checks the layouts before any work starts: mamba_ssm accepts a few that mamba-ft does not,
and those must fail with a message, not deep inside a Triton launch. Plain torch only, so the
reference imports it without Triton.
"""

from __future__ import annotations

import torch


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def normalize_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          initial_state=None, reset=None):
    """Check every layout; return (B, C) as (batch, N, L), squeezing a single group axis.

    Layouts: u, delta, z (batch, d, L); A (d, N) real; B, C (batch, N, L) or mamba_ssm's
    grouped (batch, 1, N, L); D, delta_bias (d,); initial_state (batch, d, N); reset
    (batch, L) bool. Raises ValueError naming the argument and the layout that would work.
    """
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, d, L), got {_describe(u)}.")
    batch, d, length = u.shape
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, d, length):
            raise ValueError(f"selective_scan: {name} must have u's shape {(batch, d, length)}, "
                             f"got {_describe(t)}.")
    if A.is_complex():
        raise ValueError("selective_scan: complex A (S4D-Lin) is not supported; mamba-ft's scan "
                         "takes a real A of shape (d, N).")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (d, N) = ({d}, N), got {_describe(A)}.")
    state_size = A.shape[1]
    B, C = (_per_step(name, t, batch, state_size, length) for name, t in (("B", B), ("C", C)))
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"selective_scan: {name} must be (d,) = ({d},), got {_describe(t)}.")
    if initial_state is not None and tuple(initial_state.shape) != (batch, d, state_size):
        raise ValueError(f"selective_scan: initial_state must be (batch, d, N) = "
                         f"{(batch, d, state_size)}, got {_describe(initial_state)}.")
    if reset is not None and (tuple(reset.shape) != (batch, length) or reset.dtype != torch.bool):
        raise ValueError(f"selective_scan: reset must be a bool tensor of shape (batch, L) = "
                         f"{(batch, length)}, got {_describe(reset)} {reset.dtype}.")
    return B, C


def _per_step(name, t, batch, state_size, length):
    if t.dim() == 2:
        raise ValueError(f"selective_scan: {name} of {_describe(t)} is input-independent "
                         f"(mamba_ssm's (d, N) layout), which mamba-ft's scan does not support; "
                         f"pass an input-dependent {name} of shape (batch, N, L).")
    if t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(f"selective_scan: {name} of {_describe(t)} has {t.shape[1]} groups; "
                             f"mamba-ft's scan supports one group: pass (batch, N, L) or "
                             f"(batch, 1, N, L).")
        t = t.squeeze(1)
    if tuple(t.shape) != (batch, state_size, length):
        raise ValueError(f"selective_scan: {name} must be (batch, N, L) = "
                         f"{(batch, state_size, length)}, got {_describe(t)}.")
    return t
