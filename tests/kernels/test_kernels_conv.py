"""The Triton causal conv1d against `mamba_ft.ops.reference.causal_conv1d`, outputs and gradients.

Runs under TRITON_INTERPRET=1 in a child process without a GPU (tiny shapes; see
kernel_interpreter.py), compiled and in-process with one. Tolerances as in
test_kernels_scan.py: fp32 rtol 6e-4 / atol 2e-3 (only summation order differs), bf16
3e-2 / 5e-2 (the reference computes in bf16 itself, the kernel in fp32 from bf16 inputs).
"""

from __future__ import annotations

import pytest
import torch
from kernel_interpreter import DEVICE, IN_PROCESS, in_process, run_file_under_interpreter

from mamba_ft.ops import reference

if IN_PROCESS:
    from mamba_ft.kernels.causal_conv1d import causal_conv1d_fn

FP32 = dict(rtol=6e-4, atol=2e-3)
BF16 = dict(rtol=3e-2, atol=5e-2)


def check(batch, d, L, width, dtype, tol, *, bias=True, h0=True, reset=False, silu=True, seed=0,
          rows=False):
    """`rows`: x is read as Mamba-2's mixer hands it over, a channel slice of (batch, L, more
    channels) rows seen through a transposed view (contiguous along channels), and the output's
    gradient arrives in the rows' layout too."""
    g = torch.Generator().manual_seed(seed)
    if rows:
        x = torch.randn(batch, L, d + 3, generator=g).to(DEVICE, dtype).requires_grad_()
    else:
        x = torch.randn(batch, d, L, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(d, width, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(d, generator=g).to(DEVICE, dtype).requires_grad_() if bias else None
    init = (torch.randn(batch, d, width - 1, generator=g).to(DEVICE, dtype).requires_grad_()
            if h0 else None)
    starts = None
    if reset:
        starts = (torch.rand(batch, L, generator=g) < 0.2)
        starts[:, 0] = True
        starts = starts.to(DEVICE)
    leaves = [t for t in (x, w, b, init) if t is not None]
    # The reference runs on fp32 copies of the same values: in bf16 it would round every
    # intermediate itself, and the kernel computes in fp32.
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    outs = []
    for fn, args in ((causal_conv1d_fn, leaves), (reference.causal_conv1d, ref_leaves)):
        it = iter(args)
        x_, w_ = next(it), next(it)
        if rows:
            x_ = x_[..., 1:1 + d].transpose(1, 2)
        b_ = next(it) if bias else None
        init_ = next(it) if h0 else None
        y, final = fn(x_, w_, b_, initial_state=init_, reset=starts,
                      activation="silu" if silu else None, return_final_state=True)
        # Upstream gradients exactly representable in `dtype`, so both sides receive the same.
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
        if rows:
            assert y.stride(1) == 1 or fn is reference.causal_conv1d  # stays in the rows' layout
            gy = gy.transpose(1, 2).contiguous().transpose(1, 2)
        gf = torch.randn(final.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
        loss = (y.float() * gy.float()).sum() + (final.float() * gf.float()).sum()
        outs.append((y, final, torch.autograd.grad(loss, args)))
    (y, final, grads), (y_ref, final_ref, grads_ref) = outs
    assert y.dtype == dtype and final.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, **tol)
    torch.testing.assert_close(final.float(), final_ref, rtol=0, atol=0)  # a copy of inputs
    names = ["x", "weight"] + ["bias"] * bias + ["initial_state"] * h0
    for name, gk, gr in zip(names, grads, grads_ref):
        assert gk.dtype == dtype, name
        torch.testing.assert_close(gk.float(), gr.float(), **tol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


@in_process
@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("L", [1, 2, 150])  # 150: two 128-position tiles, not a multiple
def test_conv_fp32_matches_reference(width, L):
    check(2, 5, L, width, torch.float32, FP32, reset=L > 2)


@in_process
def test_conv_without_bias_state_or_activation():
    check(1, 3, 17, 4, torch.float32, FP32, bias=False, h0=False, silu=False)


@in_process
@pytest.mark.parametrize("width", [2, 4])
def test_conv_reads_and_writes_rows_through_strides(width):
    # 70 channels, 40 positions: several channel and position tiles, neither a multiple.
    check(2, 70, 40, width, torch.float32, FP32, reset=True, rows=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
@pytest.mark.parametrize("width", [2, 4])
def test_conv_gpu_real_shapes(dtype, tol, width):
    check(4, 1536, 2048, width, dtype, tol, reset=True)
    check(2, 257, 333, width, dtype, tol, h0=False)
    check(2, 1792, 2048, width, dtype, tol, reset=True, rows=True)  # Mamba-2-130m's xBC


@pytest.mark.skipif(IN_PROCESS, reason="the tests above run in this process")
def test_kernels_under_interpreter_subprocess():
    run_file_under_interpreter(__file__)
