"""mamba-ft's fused Triton kernels (installed as `mamba_ft.kernels`).

`mamba_ft.ops` calls these on CUDA tensors when `available()` is True. Under
`TRITON_INTERPRET=1` the same kernels run on CPU tensors (slowly), which is how CI tests them.
"""

from __future__ import annotations

import functools


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an absent or broken Triton install means: use the reference ops
        return False
    return True


def available() -> bool:
    """Whether the fused kernels can run here: Triton importable and a CUDA device present."""
    import torch

    return torch.cuda.is_available() and _triton_importable()


def selective_scan_fn(*args, **kwargs):
    """Drop-in for mamba_ssm's `selective_scan_fn`: its positional order and layouts, with
    mamba-ft's `initial_state` and `reset` keyword-only. The arguments are the kernel's own
    (`selective_scan.selective_scan_fn`), forwarded as given; imported on first call so that
    importing this package needs no Triton."""
    from mamba_ft.kernels.selective_scan import selective_scan_fn as fn

    return fn(*args, **kwargs)


def mamba_chunk_scan_combined(*args, **kwargs):
    """Drop-in for mamba_ssm's Mamba-2 `mamba_chunk_scan_combined`: its positional order and
    layouts, with mamba-ft's `reset` keyword-only, semantics of
    `mamba_ft.ops.ssd_reference.mamba_chunk_scan_combined`. Forwarded as given to the kernel's
    own (`ssd.mamba_chunk_scan_combined`), imported on first call so that importing this
    package needs no Triton."""
    from mamba_ft.kernels.ssd import mamba_chunk_scan_combined as fn

    return fn(*args, **kwargs)


def causal_conv1d_fn(x, weight, bias=None, initial_state=None, reset=None, activation="silu",
                     return_final_state=False):
    """Causal depthwise conv1d, same semantics as `mamba_ft.ops.reference.causal_conv1d`."""
    from mamba_ft.kernels.causal_conv1d import causal_conv1d_fn as fn

    return fn(x, weight, bias, initial_state=initial_state, reset=reset, activation=activation,
              return_final_state=return_final_state)


def selective_state_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False):
    """One-token scan step (no gradient), same semantics as the reference's."""
    from mamba_ft.kernels.decode_steps import selective_state_step as fn

    return fn(state, u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
              delta_softplus=delta_softplus)


def ssd_state_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf"))):
    """Mamba-2's one-token SSD step (no gradient), same semantics as the reference's."""
    from mamba_ft.kernels.decode_steps import ssd_state_step as fn

    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
              dt_limit=dt_limit)


def causal_conv1d_step(x, conv_state, weight, bias=None, activation="silu"):
    """One-token conv step (no gradient), same semantics as the reference's."""
    from mamba_ft.kernels.decode_steps import causal_conv1d_step as fn

    return fn(x, conv_state, weight, bias, activation=activation)


def gated_rms_norm_fn(x, gate, weight, eps, group_size, norm_before_gate=False):
    """Gated grouped RMSNorm, same semantics as `mamba_ft.ops.reference.gated_rms_norm`."""
    from mamba_ft.kernels.gated_rms_norm import gated_rms_norm_fn as fn

    return fn(x, gate, weight, eps, group_size, norm_before_gate)


def rms_norm_fn(x, weight, eps):
    """RMSNorm over the last axis, same semantics as `mamba_ft.ops.reference.rms_norm`."""
    from mamba_ft.kernels.rms_norm import rms_norm_fn as fn

    return fn(x, weight, eps)
