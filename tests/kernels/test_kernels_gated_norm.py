"""The Triton gated RMSNorm against `mamba_ft.ops.reference.gated_rms_norm` (transformers'
`MambaRMSNormGated` formula: the Mamba-2 parity tests hold the mixer to transformers).

Runs under TRITON_INTERPRET=1 in a child process without a GPU (see kernel_interpreter.py),
compiled and in-process with one. Output and every gradient (x, the gate z, the weight), with
and without a gate, gate-then-norm and norm-then-gate (Falcon-H1), one group and several.
fp32: rtol/atol 1e-5 (the same sums in another order over a group's channels). bf16 input:
the kernel keeps fp32 products where autograd rounds intermediate results to bf16, so outputs
agree within a bf16 step (rtol 1e-2) and gradients as for the other kernels (3e-2 / 5e-2).
"""

from __future__ import annotations

import pytest
import torch
from kernel_interpreter import DEVICE, IN_PROCESS, in_process, run_file_under_interpreter

from mamba_ft.ops.reference import gated_rms_norm

if IN_PROCESS:
    from mamba_ft.kernels.gated_rms_norm import gated_rms_norm_fn

FP32 = dict(rtol=1e-5, atol=1e-5)
BF16_OUT = dict(rtol=1e-2, atol=1e-2)
BF16_GRAD = dict(rtol=3e-2, atol=5e-2)


def check(shape, group_size, gate, norm_before_gate, dtype, out_tol, grad_tol, eps=1e-5):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 2).to(DEVICE, dtype).requires_grad_()
    z = (torch.randn(*shape, generator=g) * 2).to(DEVICE, dtype).requires_grad_() if gate else None
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(DEVICE).requires_grad_()
    y = gated_rms_norm_fn(x, z, w, eps, group_size, norm_before_gate)
    y_ref = gated_rms_norm(x, z, w, eps, group_size, norm_before_gate)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **out_tol)
    dy = torch.randn(*shape, generator=g).to(DEVICE, y.dtype)
    inputs = (x, w) if z is None else (x, z, w)
    grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    for name, gk, gr in zip(("x", "weight") if z is None else ("x", "z", "weight"), grads, grads_ref):
        assert gk.dtype == gr.dtype, name
        torch.testing.assert_close(gk.float(), gr.float(), **grad_tol,
                                   msg=lambda m, n=name: f"{n}: {m}")


@in_process
@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate-then-norm", "norm-then-gate"])
@pytest.mark.parametrize("gate", [True, False], ids=["gated", "no-gate"])
@pytest.mark.parametrize("shape,group_size", [((2, 7, 24), 24), ((3, 5, 48), 12), ((1, 1, 40), 20)])
def test_gated_norm_fp32_matches_reference(shape, group_size, gate, norm_before_gate):
    check(shape, group_size, gate, norm_before_gate, torch.float32, FP32, FP32)


@in_process
@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_gated_norm_bf16_input_matches_reference(norm_before_gate):
    check((2, 9, 64), 32, True, norm_before_gate, torch.bfloat16, BF16_OUT, BF16_GRAD)


@in_process
def test_group_size_must_divide_the_channels():
    x = torch.randn(2, 3, 10, device=DEVICE)
    with pytest.raises(ValueError, match="group_size 4 does not divide 10"):
        gated_rms_norm_fn(x, None, torch.ones(10, device=DEVICE), 1e-5, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,group_size", [((8, 2048, 1536), 1536), ((2, 2048, 4096), 512)])
def test_gated_norm_gpu_real_shapes(shape, group_size):
    check(shape, group_size, True, False, torch.float32, FP32, dict(rtol=1e-4, atol=1e-4))
    check(shape, group_size, True, False, torch.bfloat16, BF16_OUT, BF16_GRAD)


@pytest.mark.skipif(IN_PROCESS, reason="ran in-process above")
def test_under_the_interpreter():
    run_file_under_interpreter(__file__)
