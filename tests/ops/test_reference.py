"""The reference ops against naive, obviously-correct loops (float64 inputs).

The reference computes in fp32 whatever the input dtype, so float64 loops agree with it to
fp32 rounding: 1e-5 absolute on O(1) values is ~100 ulps of fp32, far below any real bug.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba_ft.ops import reference

TOL = dict(atol=1e-5, rtol=1e-5)


def naive_scan(u, delta, A, B, C, D, z, delta_bias, h0, reset, softplus=True):
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if softplus:
        delta = F.softplus(delta)
    h = h0.clone() if h0 is not None else u.new_zeros(*u.shape[:2], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        if reset is not None:
            h = h * (~reset[:, t]).to(h.dtype)[:, None, None]
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + u * D[None, :, None]
    return (y * F.silu(z) if z is not None else y), h


def scan_inputs(b, d, L, N):
    tensors = [torch.randn(b, d, L), torch.randn(b, d, L), -torch.rand(d, N) - 0.1,
               torch.randn(b, N, L), torch.randn(b, N, L), torch.randn(d), torch.randn(b, d, L),
               torch.randn(d), torch.randn(b, d, N)]
    return [t.double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("b,d,L,N,chunk", [(2, 5, 23, 4, 5), (1, 3, 1, 8, 16), (2, 4, 32, 16, 16), (1, 6, 17, 2, 64)])
@pytest.mark.parametrize("with_reset", [False, True])
def test_scan_matches_naive_loop_outputs_and_all_gradients(b, d, L, N, chunk, with_reset):
    inputs = scan_inputs(b, d, L, N)
    reset = (torch.rand(b, L) < 0.25) if with_reset else None
    y, h = reference.selective_scan(*inputs[:8], delta_softplus=True, initial_state=inputs[8],
                                    reset=reset, return_last_state=True, chunk_size=chunk)
    y_ref, h_ref = naive_scan(*inputs, reset)
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    torch.testing.assert_close(h.double(), h_ref, **TOL)
    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), inputs)
    for name, g, g_ref in zip("u delta A B C D z delta_bias h0".split(), grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, **TOL, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", [(False, False, False, False), (True, False, True, False), (False, True, False, True)])
def test_scan_optional_parts(use_D, use_z, use_bias, softplus):
    u, delta, A, B, C, D, z, bias, _ = (t.detach() for t in scan_inputs(2, 4, 9, 3))
    delta = delta.abs() if not softplus else delta  # without softplus, delta must be >= 0
    D, z, bias = (D if use_D else None), (z if use_z else None), (bias if use_bias else None)
    y = reference.selective_scan(u, delta, A, B, C, D, z, bias, softplus)
    y_ref, _ = naive_scan(u, delta, A, B, C, D, z, bias, None, None, softplus)
    torch.testing.assert_close(y, y_ref, **TOL)


def test_scan_keeps_input_dtype_and_fp32_state():
    u, delta, A, B, C = (t.detach().float() for t in scan_inputs(2, 4, 9, 3)[:5])
    y, h = reference.selective_scan(u.bfloat16(), delta, A, B, C, delta_softplus=True, return_last_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    full = reference.selective_scan(u, delta, A, B, C, delta_softplus=True)
    # bf16 rounding of u (8 bits of mantissa) and of the output: ~1e-2 relative.
    torch.testing.assert_close(y.float(), full, atol=3e-2, rtol=3e-2)


def test_scan_reset_equals_documents_run_separately():
    b, d, L, N = 1, 4, 20, 3
    u, delta, A, B, C, D, z, bias, _ = (t.detach() for t in scan_inputs(b, d, L, N))
    starts = [0, 7, 15]
    reset = torch.zeros(b, L, dtype=torch.bool)
    reset[0, starts] = True
    packed = reference.selective_scan(u, delta, A, B, C, D, z, bias, True, reset=reset, chunk_size=4)
    bounds = starts + [L]
    for s, e in zip(bounds[:-1], bounds[1:]):
        alone = reference.selective_scan(u[..., s:e], delta[..., s:e], A, B[..., s:e], C[..., s:e],
                                         D, z[..., s:e], bias, True, chunk_size=4)
        torch.testing.assert_close(packed[..., s:e], alone, **TOL)


def test_scan_chunks_split_like_one_pass():
    u, delta, A, B, C, D, z, bias, h0 = (t.detach().float() for t in scan_inputs(2, 3, 30, 4))
    whole, h_whole = reference.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                                              return_last_state=True, chunk_size=7)
    first, h_mid = reference.selective_scan(u[..., :11], delta[..., :11], A, B[..., :11], C[..., :11], D,
                                            z[..., :11], bias, True, initial_state=h0, return_last_state=True)
    second, h_end = reference.selective_scan(u[..., 11:], delta[..., 11:], A, B[..., 11:], C[..., 11:], D,
                                             z[..., 11:], bias, True, initial_state=h_mid, return_last_state=True)
    torch.testing.assert_close(torch.cat([first, second], -1), whole, **TOL)
    torch.testing.assert_close(h_end, h_whole, **TOL)


def test_state_step_equals_scan_one_position_at_a_time():
    u, delta, A, B, C, D, z, bias, h0 = (t.detach().float() for t in scan_inputs(2, 5, 6, 4))
    full, h_full = reference.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                                            return_last_state=True)
    h = h0
    for t in range(6):
        y, h = reference.selective_state_step(h, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
                                              z[..., t], bias, True)
        torch.testing.assert_close(y, full[..., t], **TOL)
    torch.testing.assert_close(h, h_full, **TOL)


@pytest.mark.parametrize("width", [2, 3, 4])
def test_conv_matches_torch_conv1d_and_carries_state(width):
    b, d, L = 2, 5, 13
    x, w, bias = torch.randn(b, d, L), torch.randn(d, width), torch.randn(d)
    expected = F.silu(F.conv1d(x, w.unsqueeze(1), bias, padding=width - 1, groups=d)[..., :L])
    y, last = reference.causal_conv1d(x, w, bias, return_final_state=True)
    torch.testing.assert_close(y, expected, **TOL)
    torch.testing.assert_close(last, x[..., -(width - 1):])
    # Split the sequence: the carried state makes the second half see the first.
    y1, s1 = reference.causal_conv1d(x[..., :6], w, bias, return_final_state=True)
    y2 = reference.causal_conv1d(x[..., 6:], w, bias, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], -1), expected, **TOL)
    # One token at a time.
    state = torch.zeros(b, d, width - 1)
    for t in range(L):
        yt, state = reference.causal_conv1d_step(x[..., t], state, w, bias)
        torch.testing.assert_close(yt, expected[..., t], **TOL)


def test_conv_reset_equals_documents_run_separately():
    b, d, L, width = 2, 3, 12, 4
    x, w, bias = torch.randn(b, d, L), torch.randn(d, width), torch.randn(d)
    reset = torch.zeros(b, L, dtype=torch.bool)
    reset[0, [0, 5]] = True
    reset[1, [3, 4, 10]] = True
    packed = reference.causal_conv1d(x, w, bias, reset=reset)
    for row in range(b):
        starts = [0] + [int(i) for i in torch.nonzero(reset[row]).flatten() if i > 0] + [L]
        for s, e in zip(starts[:-1], starts[1:]):
            alone = reference.causal_conv1d(x[row:row + 1, :, s:e], w, bias)
            torch.testing.assert_close(packed[row:row + 1, :, s:e], alone, **TOL)
