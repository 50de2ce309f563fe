"""Dispatch for the mixer's ops: the fused Triton kernels on CUDA, the reference ops elsewhere.

The mixer calls only these functions, so the choice of implementation lives in one place.
`MAMBA_FT_OPS=reference` forces the reference path (useful to compare paths on a GPU);
`MAMBA_FT_OPS=kernels` runs the kernels on CPU tensors too, which Triton can do only through
its interpreter (`TRITON_INTERPRET=1`, tiny shapes): how the CPU tests run whole mixers
through the kernels.
"""

from __future__ import annotations

import os

import torch

from mamba_ft.ops import reference, ssd_reference


_MODES = ("auto", "reference", "kernels")


def use_fused(t: torch.Tensor) -> bool:
    """True when the fused Triton kernels should run for a tensor on this device."""
    mode = os.environ.get("MAMBA_FT_OPS", "auto")
    if mode not in _MODES:
        raise ValueError(f"MAMBA_FT_OPS={mode!r} is not one of {', '.join(_MODES)}")
    if mode == "kernels" and not t.is_cuda:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("MAMBA_FT_OPS=kernels on CPU tensors needs Triton's interpreter: "
                               "start Python with TRITON_INTERPRET=1 set")
        return True
    if not t.is_cuda or mode == "reference":
        return False
    from mamba_ft.kernels import available

    return available()


def selective_scan(*args, **kwargs):
    """Selective scan over (batch, d, L): the arguments of `reference.selective_scan` (and of
    the kernel, whose signature a test holds equal), forwarded as given."""
    u = args[0] if args else kwargs["u"]
    if use_fused(u):
        from mamba_ft.kernels import selective_scan_fn as scan
    else:
        scan = reference.selective_scan
    return scan(*args, **kwargs)


def causal_conv1d(x, weight, bias=None, initial_state=None, reset=None, activation="silu",
                  return_final_state=False):
    """Causal depthwise conv over (batch, d, L); see `mamba_ft.ops.reference.causal_conv1d`."""
    if use_fused(x):
        from mamba_ft.kernels import causal_conv1d_fn

        return causal_conv1d_fn(x, weight, bias, initial_state=initial_state, reset=reset,
                                activation=activation, return_final_state=return_final_state)
    return reference.causal_conv1d(x, weight, bias, initial_state=initial_state, reset=reset,
                                   activation=activation, return_final_state=return_final_state)


def rms_norm(x, weight, eps):
    """RMSNorm over the last axis; see `mamba_ft.ops.reference.rms_norm`."""
    if use_fused(x):
        from mamba_ft.kernels import rms_norm_fn

        return rms_norm_fn(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def gated_rms_norm(x, gate, weight, eps, group_size, norm_before_gate=False):
    """Mamba-2's gated, grouped RMSNorm; see `mamba_ft.ops.reference.gated_rms_norm`."""
    if use_fused(x):
        from mamba_ft.kernels import gated_rms_norm_fn

        return gated_rms_norm_fn(x, gate, weight, eps, group_size, norm_before_gate)
    return reference.gated_rms_norm(x, gate, weight, eps, group_size, norm_before_gate)


def _decode_kernel_applies(*tensors) -> bool:
    # The one-token kernels are forward only: with a gradient to compute, the differentiable
    # reference steps run instead.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    return use_fused(tensors[0]) and not needs_grad


def selective_state_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, out=None):
    """One decoding step of the scan; see `mamba_ft.ops.reference.selective_state_step`."""
    if _decode_kernel_applies(u, state, delta, A, B, C, D, z, delta_bias):
        from mamba_ft.kernels import selective_state_step as step
    else:
        step = reference.selective_state_step
    return step(state, u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                delta_softplus=delta_softplus, out=out)


def causal_conv1d_step(x, conv_state, weight, bias=None, activation="silu"):
    """One decoding step of the conv; see `mamba_ft.ops.reference.causal_conv1d_step`."""
    if _decode_kernel_applies(x, conv_state, weight, bias):
        from mamba_ft.kernels import causal_conv1d_step as step
    else:
        step = reference.causal_conv1d_step
    return step(x, conv_state, weight, bias, activation=activation)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False, *,
                              reset=None):
    """Mamba-2's SSD chunked scan; see `mamba_ft.ops.ssd_reference.mamba_chunk_scan_combined`
    (the Triton kernels, `mamba_ft.kernels.ssd`, on CUDA)."""
    if use_fused(x):
        from mamba_ft.kernels import mamba_chunk_scan_combined as scan
    else:
        scan = ssd_reference.mamba_chunk_scan_combined
    return scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                dt_softplus, dt_limit, return_final_states, return_varlen_states, reset=reset)


def ssd_state_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), out=None):
    """One decoding step of the SSD scan; see `mamba_ft.ops.ssd_reference.ssd_state_step`."""
    if _decode_kernel_applies(x, state, dt, A, B, C, D, z, dt_bias):
        from mamba_ft.kernels import ssd_state_step as step
    else:
        step = ssd_reference.ssd_state_step
    return step(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                dt_limit=dt_limit, out=out)
