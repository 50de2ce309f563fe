"""The layout-aware projections against F.linear on transposed tensors.

fp32 on the CPU: the two computations are the same sums in a different order, so outputs and
gradients agree to 1e-5 relative (a few fp32 roundings over a 48-long dot product). Gradients
must also come back in their input's layout (the point of these functions: no copies).
"""

import pytest
import torch
import torch.nn.functional as F

from mamba_ft.ops.projections import (LowRankPath, channels_first, channels_first_to_rows,
                                  rows_to_channels_first)

TOL = dict(rtol=1e-5, atol=1e-5)


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64).float().requires_grad_()


def _grads(out, leaves, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, leaves, g, retain_graph=True)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_lora", [False, True])
def test_rows_to_channels_first_matches_linear(with_bias, with_lora):
    torch.manual_seed(0)
    x, w = _leaf(3, 7, 48), _leaf(20, 48)
    bias = _leaf(20) if with_bias else None
    lora = LowRankPath(A=_leaf(4, 48), B=_leaf(20, 4), scale=0.5) if with_lora else None
    leaves = [t for t in (x, w, bias) if t is not None] + ([lora.A, lora.B] if lora else [])

    out = rows_to_channels_first(x, w, bias, lora)
    assert out.shape == (3, 20, 7) and out.is_contiguous()
    ref = F.linear(x, w, bias)
    if lora:
        ref = ref + lora(x)
    ref = ref.transpose(1, 2)
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(_grads(out, leaves), _grads(ref, leaves)):
        torch.testing.assert_close(got, want, **TOL)
    assert _grads(out, [x])[0].is_contiguous()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_lora", [False, True])
def test_channels_first_to_rows_matches_linear(with_bias, with_lora):
    torch.manual_seed(0)
    y, w = _leaf(3, 48, 7), _leaf(20, 48)
    bias = _leaf(20) if with_bias else None
    lora = LowRankPath(A=_leaf(4, 48), B=_leaf(20, 4), scale=2.0) if with_lora else None
    leaves = [t for t in (y, w, bias) if t is not None] + ([lora.A, lora.B] if lora else [])

    out = channels_first_to_rows(y, w, bias, lora)
    assert out.shape == (3, 7, 20) and out.is_contiguous()
    rows = y.transpose(1, 2)
    ref = F.linear(rows, w, bias) + (lora(rows) if lora else 0)
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(_grads(out, leaves), _grads(ref, leaves)):
        torch.testing.assert_close(got, want, **TOL)
    # The gradient reaching the scan must be time-contiguous, like its input.
    assert _grads(out, [y])[0].is_contiguous()


def test_channels_first_matches_linear():
    torch.manual_seed(0)
    x, w = _leaf(3, 48, 7), _leaf(20, 48)
    out = channels_first(x, w)
    ref = F.linear(x.transpose(1, 2), w).transpose(1, 2)
    torch.testing.assert_close(out, ref, **TOL)
    for got, want in zip(_grads(out, [x, w]), _grads(ref, [x, w])):
        torch.testing.assert_close(got, want, **TOL)


def test_autocast_runs_the_matmuls_in_bf16_and_keeps_fp32_weight_grads():
    torch.manual_seed(0)
    x, w = _leaf(2, 5, 32), _leaf(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rows_to_channels_first(x, w)
        back = channels_first_to_rows(out, w.t().contiguous().detach())
    assert out.dtype == back.dtype == torch.bfloat16
    dx, dw = _grads(back.float(), [x, w])
    assert dx.dtype == dw.dtype == torch.float32
    # Against F.linear under the same autocast: both are bf16 GEMMs with fp32 accumulation,
    # so they differ by bf16 roundings of the intermediate (8-bit mantissa): 2% of the
    # output's scale.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(F.linear(x, w), w.t())
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(back.float(), ref.float(), rtol=2e-2, atol=2e-2 * scale)


def test_frozen_weight_keeps_no_input_for_the_backward():
    """With a frozen weight the input is not saved (its only use is the weight's gradient),
    and the input's gradient is still right."""
    torch.manual_seed(0)
    x, w = _leaf(2, 5, 32), torch.randn(16, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = rows_to_channels_first(x, w)
        back = channels_first_to_rows(out, w.t().contiguous())
    assert not any(t.shape in (x.shape, out.shape) for t in saved)
    ref = F.linear(F.linear(x, w), w.t())
    torch.testing.assert_close(_grads(back, [x])[0], _grads(ref, [x])[0], **TOL)
