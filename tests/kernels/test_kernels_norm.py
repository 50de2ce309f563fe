"""The Triton RMSNorm against `mamba_ft.ops.reference.rms_norm` (transformers' formula).

Runs under TRITON_INTERPRET=1 in a child process without a GPU (see kernel_interpreter.py),
compiled and in-process with one. fp32: rtol/atol 1e-5 (the same sums in another order over
at most a few thousand terms). bf16 input: the output is rounded to bf16 by both (the
normalised input is cast back before the weight), so they agree within one bf16 step,
rtol 1e-2; the gradients go through that rounding (the kernel keeps the fp32 product where
autograd rounds it to bf16), rtol 3e-2 / atol 5e-2 as for the other kernels.
"""

from __future__ import annotations

import pytest
import torch
from kernel_interpreter import DEVICE, IN_PROCESS, in_process, run_file_under_interpreter
from transformers.models.mamba.modeling_mamba import MambaRMSNorm

from mamba_ft.ops import reference

if IN_PROCESS:
    from mamba_ft.kernels.rms_norm import rms_norm_fn

FP32 = dict(rtol=1e-5, atol=1e-5)
BF16_OUT = dict(rtol=1e-2, atol=1e-2)
BF16_GRAD = dict(rtol=3e-2, atol=5e-2)


def check(shape, dtype, out_tol, grad_tol, eps=1e-5):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(DEVICE).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(DEVICE)
    y = rms_norm_fn(x, w, eps)
    y_ref = reference.rms_norm(x, w, eps)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **out_tol)
    grads = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    grads_ref = torch.autograd.grad(y_ref, (x, w), dy.to(y_ref.dtype))
    for name, gk, gr in zip(("x", "weight"), grads, grads_ref):
        assert gk.dtype == gr.dtype, name
        torch.testing.assert_close(gk.float(), gr.float(), **grad_tol, msg=lambda m, n=name: f"{n}: {m}")


def test_reference_is_transformers_formula():
    norm = MambaRMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(reference.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=0, atol=0)


@in_process
@pytest.mark.parametrize("shape", [(2, 7, 24), (1, 1, 5), (3, 33, 100)])
def test_rms_norm_fp32_matches_reference(shape):
    check(shape, torch.float32, FP32, FP32)


@in_process
def test_rms_norm_bf16_input_matches_reference():
    check((2, 9, 48), torch.bfloat16, BF16_OUT, BF16_GRAD)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 2048, 768), (2, 2048, 2048), (3, 77, 1000)])
def test_rms_norm_gpu_real_shapes(shape):
    check(shape, torch.float32, FP32, dict(rtol=1e-4, atol=1e-4))
    check(shape, torch.bfloat16, BF16_OUT, BF16_GRAD)


@pytest.mark.skipif(IN_PROCESS, reason="the tests above run in this process")
def test_kernels_under_interpreter_subprocess():
    run_file_under_interpreter(__file__)

