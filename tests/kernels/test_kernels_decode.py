"""The one-token Triton steps against `mamba_ft.ops.reference`'s (and Mamba-2's against
`mamba_ft.ops.ssd_reference.ssd_state_step`), and decoding through them.

Runs under TRITON_INTERPRET=1 in a child process without a GPU (see kernel_interpreter.py),
compiled and in-process with one. Tolerances as in test_kernels_scan.py: fp32 rtol 6e-4 /
atol 2e-3 (summation order only), bf16 3e-2 / 5e-2 (the reference's conv step sums in bf16,
the kernel in fp32). Ten steps in a row are checked too, so a wrong state is caught by the
steps that read it.
"""

from __future__ import annotations

import pytest
import torch
from kernel_interpreter import DEVICE, IN_PROCESS, in_process, run_file_under_interpreter

from mamba_ft import ops
from mamba_ft.ops import dispatch
from mamba_ft.ops import reference, ssd_reference

if IN_PROCESS:
    from mamba_ft.kernels.decode_steps import (causal_conv1d_step, selective_state_step,
                                               ssd_state_step)

FP32 = dict(rtol=6e-4, atol=2e-3)
BF16 = dict(rtol=3e-2, atol=5e-2)


def _randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _step_into(step, state, out, *args, **kw):
    """`step` with its new state written into `out`: "same" (the old state, as the mixers
    decode), "strided" (a transposed buffer the kernel cannot write directly) or None."""
    if out is None:
        return step(state, *args, **kw)
    target = state if out == "same" else torch.empty_like(state.transpose(-1, -2)).transpose(-1, -2)
    y, new_state = step(state, *args, **kw, out=target)
    assert new_state is target
    return y, new_state


def check_state_steps(batch, d, N, dtype, tol, *, D=True, z=True, bias=True, softplus=True,
                      out=None):
    g = torch.Generator().manual_seed(0)
    A = -torch.rand(d, N, generator=g).to(DEVICE) * 4 - 0.1
    Dv = _randn(g, d) if D else None
    bv = _randn(g, d, scale=0.5) if bias else None
    state = _randn(g, batch, d, N)
    state_ref = state.clone()  # the kernel may write into `state`
    for step in range(10):
        u, delta, zv = (_randn(g, batch, d, dtype=dtype) for _ in range(3))
        B, C = _randn(g, batch, N, dtype=dtype), _randn(g, batch, N, dtype=dtype)
        kw = dict(D=Dv, z=zv if z else None, delta_bias=bv, delta_softplus=softplus)
        y, state = _step_into(selective_state_step, state, out, u, delta, A, B, C, **kw)
        y_ref, state_ref = reference.selective_state_step(state_ref, u, delta, A, B, C, **kw)
        assert y.dtype == dtype and state.dtype == torch.float32
        torch.testing.assert_close(y.float(), y_ref.float(), **tol, msg=lambda m: f"y, step {step}: {m}")
        torch.testing.assert_close(state, state_ref, **FP32, msg=lambda m: f"state, step {step}: {m}")


def check_ssd_steps(batch, heads, groups, P, N, dtype, tol, *, D="head", z=True, bias=True,
                    softplus=True, limit=(0.0, float("inf")), out=None):
    """Ten Mamba-2 steps in a row: heads read their group's B and C; D per head or channel."""
    g = torch.Generator().manual_seed(2)
    A = -torch.rand(heads, generator=g).to(DEVICE) * 4 - 0.1
    Dv = {"head": _randn(g, heads), "channel": _randn(g, heads, P), None: None}[D]
    bv = _randn(g, heads, scale=0.5) if bias else None
    state = _randn(g, batch, heads, P, N)
    state_ref = state.clone()  # the kernel may write into `state`
    for step in range(10):
        x, zv = _randn(g, batch, heads, P, dtype=dtype), _randn(g, batch, heads, P, dtype=dtype)
        dt = _randn(g, batch, heads, dtype=dtype)
        B, C = _randn(g, batch, groups, N, dtype=dtype), _randn(g, batch, groups, N, dtype=dtype)
        kw = dict(D=Dv, z=zv if z else None, dt_bias=bv, dt_softplus=softplus, dt_limit=limit)
        y, state = _step_into(ssd_state_step, state, out, x, dt, A, B, C, **kw)
        y_ref, state_ref = ssd_reference.ssd_state_step(state_ref, x, dt, A, B, C, **kw)
        assert y.dtype == dtype and state.dtype == torch.float32
        torch.testing.assert_close(y.float(), y_ref.float(), **tol, msg=lambda m: f"y, step {step}: {m}")
        torch.testing.assert_close(state, state_ref, **FP32, msg=lambda m: f"state, step {step}: {m}")


def check_conv_steps(batch, d, width, dtype, tol, *, bias=True, silu=True):
    g = torch.Generator().manual_seed(1)
    w = _randn(g, d, width, dtype=dtype, scale=0.5)
    b = _randn(g, d, dtype=dtype) if bias else None
    state = state_ref = _randn(g, batch, d, width - 1, dtype=dtype)
    act = "silu" if silu else None
    for step in range(10):
        x = _randn(g, batch, d, dtype=dtype)
        y, state = causal_conv1d_step(x, state, w, b, activation=act)
        # The reference sums in x's dtype; on fp32 copies it is the exact oracle.
        y_ref, state_ref = reference.causal_conv1d_step(
            x.float(), state_ref.float(), w.float(), None if b is None else b.float(), activation=act)
        assert y.dtype == dtype and state.dtype == dtype
        torch.testing.assert_close(y.float(), y_ref, **tol, msg=lambda m: f"y, step {step}: {m}")
        # The new state is a shift of the window: exactly the inputs.
        torch.testing.assert_close(state.float(), state_ref, rtol=0, atol=0)
        state_ref = state_ref.to(dtype)


@in_process
@pytest.mark.parametrize("N", [4, 5, 16])
def test_state_step_fp32_matches_reference(N):
    check_state_steps(2, 7, N, torch.float32, FP32)


@in_process
def test_state_step_without_options():
    check_state_steps(1, 3, 4, torch.float32, FP32, D=False, z=False, bias=False, softplus=False)


@in_process
@pytest.mark.parametrize("width", [2, 3, 4])
def test_conv_step_fp32_matches_reference(width):
    check_conv_steps(2, 5, width, torch.float32, FP32)


@in_process
def test_conv_step_without_bias_or_activation():
    check_conv_steps(1, 3, 4, torch.float32, FP32, bias=False, silu=False)


@in_process
@pytest.mark.parametrize("heads,groups,P,N", [(4, 1, 8, 16), (6, 2, 5, 7), (2, 2, 16, 4)])
def test_ssd_step_fp32_matches_reference(heads, groups, P, N):
    check_ssd_steps(2, heads, groups, P, N, torch.float32, FP32)


@in_process
def test_ssd_step_options_and_limits():
    check_ssd_steps(1, 4, 2, 8, 8, torch.float32, FP32, D="channel", limit=(0.01, 0.5))
    check_ssd_steps(1, 4, 1, 8, 8, torch.float32, FP32, D=None, z=False, bias=False,
                    softplus=False, limit=(0.001, float("inf")))


@in_process
@pytest.mark.parametrize("out", ["same", "strided"])
def test_steps_write_the_new_state_into_out(out):
    """Decoding writes each new state into the cache's own tensor (`out` is the old state), or,
    where the kernel cannot write `out` directly, copies it there."""
    check_state_steps(2, 37, 5, torch.float32, FP32, out=out)
    check_ssd_steps(2, 6, 2, 5, 7, torch.float32, FP32, out=out)


def test_reference_steps_write_the_new_state_into_out():
    g = torch.Generator().manual_seed(0)
    state = torch.randn(2, 3, 4, generator=g)
    args = [torch.randn(2, 3, generator=g), torch.rand(2, 3, generator=g),
            -torch.rand(3, 4, generator=g), torch.randn(2, 4, generator=g),
            torch.randn(2, 4, generator=g)]
    y, expected = reference.selective_state_step(state, *args)
    y_out, new_state = reference.selective_state_step(state, *args, out=state)
    assert new_state is state and torch.equal(state, expected) and torch.equal(y_out, y)


@in_process
def test_ops_use_the_kernels_only_without_gradient(monkeypatch):
    """Generation (no grad) goes through the kernels on a device where they run; a step that
    needs a gradient keeps the differentiable reference."""
    if DEVICE == "cpu":
        monkeypatch.setattr(dispatch, "use_fused", lambda t: True)
    calls = []
    import mamba_ft.kernels.decode_steps as steps

    real = steps.causal_conv1d_step
    monkeypatch.setattr(steps, "causal_conv1d_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, state, w = (torch.randn(1, 3, device=DEVICE), torch.randn(1, 3, 3, device=DEVICE),
                   torch.randn(3, 4, device=DEVICE))
    with torch.no_grad():
        ops.causal_conv1d_step(x, state, w)
    assert calls == [1]
    ops.causal_conv1d_step(x, state, w.requires_grad_())
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_ssd_step_gpu_real_shapes(dtype, tol):
    check_ssd_steps(4, 64, 1, 64, 128, dtype, tol)  # Mamba-2-1.3B's layer


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_steps_gpu_real_shapes(dtype, tol):
    check_state_steps(8, 1536, 16, dtype, tol)
    check_state_steps(3, 97, 64, dtype, tol)
    check_conv_steps(8, 1536, 4, dtype, tol)


@pytest.mark.gpu
def test_greedy_generation_through_the_kernels_matches_the_reference(monkeypatch):
    """A tiny Mamba generates the same tokens through the decode kernels as through the
    reference ops, and the logits of every step agree (fp32; 1e-4: summation order only)."""
    from mamba_ft.models import load_model

    cfg = dict(model_type="mamba", vocab_size=128, hidden_size=64, state_size=16,
               num_hidden_layers=2, expand=2, conv_kernel=4)
    model = load_model(cfg, need_tokenizer=False, seed=0).model.cuda().eval()
    ids = torch.randint(0, 128, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runs = {}
    for path in ("auto", "reference"):
        monkeypatch.setenv("MAMBA_FT_OPS", path)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        runs[path] = out
    assert torch.equal(runs["auto"].sequences, runs["reference"].sequences)
    for a, b in zip(runs["auto"].logits, runs["reference"].logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(IN_PROCESS, reason="the tests above run in this process")
def test_kernels_under_interpreter_subprocess():
    run_file_under_interpreter(__file__)
