"""The chunked SSD reference against a naive per-step recurrence written here.

The oracle steps h_t = keep_t * exp(dt_t A) h_{t-1} + dt_t x_t B_t^T per head and reads
y_t = h_t C_t + D x_t, (* silu(z_t)), in float64, under plain autograd. The reference computes
in fp32 in another order (a (T, T) matrix per chunk, states chained between chunks), so the
two agree to fp32 rounding: outputs and every gradient within 1e-5 absolute and relative on
these O(1) inputs, the Mamba-1 reference's bound (a wrong chunk boundary, mask or group
mapping is off by O(1e-1), far above it).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mamba_ft.ops.ssd_reference import mamba_chunk_scan_combined, ssd_state_step

TOL = dict(atol=1e-5, rtol=1e-5)


def naive_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None,
              dt_softplus=False, dt_limit=(0.0, math.inf), reset=None):
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    group_of = torch.arange(heads) // (heads // groups)
    Bh, Ch = B[:, :, group_of], C[:, :, group_of]  # (b, L, h, n)
    h = (initial_states if initial_states is not None
         else x.new_zeros(batch, heads, head_dim, n))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # (b, h, 1, 1)
        if reset is not None:
            decay = decay * (~reset[:, t]).to(x.dtype)[:, None, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", h, Ch[:, t])
        if D is not None:
            y = y + x[:, t] * (D[:, None] if D.dim() == 1 else D)
        if z is not None:
            y = y * F.silu(z[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), h


def make_inputs(batch=2, length=21, heads=4, head_dim=3, groups=2, n=5, D_shape="head",
                z=True, initial=True, resets=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(batch, length, heads, head_dim, generator=g),
        "dt": torch.randn(batch, length, heads, generator=g) - 1.0,
        "A": -torch.rand(heads, generator=g) * 3 - 0.2,
        "B": torch.randn(batch, length, groups, n, generator=g),
        "C": torch.randn(batch, length, groups, n, generator=g),
        "dt_bias": torch.randn(heads, generator=g) * 0.5,
    }
    if D_shape == "head":
        t["D"] = torch.randn(heads, generator=g)
    elif D_shape == "head_dim":
        t["D"] = torch.randn(heads, head_dim, generator=g)
    if z:
        t["z"] = torch.randn(batch, length, heads, head_dim, generator=g)
    if initial:
        t["initial_states"] = torch.randn(batch, heads, head_dim, n, generator=g)
    reset = None
    if resets:
        reset = torch.rand(batch, length, generator=g) < 0.15
        reset[0, min(5, length - 1)] = True
    return t, reset


def compare(tensors, reset, chunk, dt_limit=(0.0, math.inf)):
    ours_in = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    ref_in = {k: v.double().clone().requires_grad_() for k, v in tensors.items()}
    y, last = mamba_chunk_scan_combined(
        ours_in["x"], ours_in["dt"], ours_in["A"], ours_in["B"], ours_in["C"], chunk,
        ours_in.get("D"), ours_in.get("z"), ours_in["dt_bias"], ours_in.get("initial_states"),
        dt_softplus=True, dt_limit=dt_limit, return_final_states=True, reset=reset)
    y_ref, last_ref = naive_ssd(**ref_in, dt_softplus=True, dt_limit=dt_limit, reset=reset)
    torch.testing.assert_close(y, y_ref.float(), **TOL)
    torch.testing.assert_close(last, last_ref.float(), **TOL)
    # Weights on both outputs, so every gradient path (final state included) is exercised.
    g = torch.Generator().manual_seed(1)
    wy, wl = torch.randn(y.shape, generator=g), torch.randn(last.shape, generator=g)
    ((y * wy).sum() + (last * wl).sum()).backward()
    ((y_ref * wy.double()).sum() + (last_ref * wl.double()).sum()).backward()
    for name in tensors:
        assert ours_in[name].grad is not None, name
        torch.testing.assert_close(ours_in[name].grad, ref_in[name].grad.float(), **TOL,
                                   msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("length,chunk", [(21, 8), (16, 8), (1, 8), (5, 16), (13, 1)],
                         ids=["L-not-multiple", "L-multiple", "L1", "L-below-chunk", "chunk1"])
def test_outputs_and_every_gradient_match_the_recurrence(length, chunk):
    tensors, reset = make_inputs(length=length)
    compare(tensors, reset, chunk)


@pytest.mark.parametrize("case", [
    dict(groups=1), dict(groups=4), dict(D_shape="head_dim"), dict(D_shape=None, z=False),
    dict(initial=False), dict(resets=False), dict(heads=1, groups=1), dict(batch=1),
])
def test_variants_match_the_recurrence(case):
    tensors, reset = make_inputs(**case)
    compare(tensors, reset, 8)


def test_dt_limit_clamps_like_the_recurrence():
    tensors, reset = make_inputs()
    compare(tensors, reset, 8, dt_limit=(0.05, 0.5))


def test_reset_at_the_first_position_drops_the_initial_state():
    tensors, _ = make_inputs(resets=False)
    reset = torch.zeros(2, 21, dtype=torch.bool)
    reset[:, 0] = True
    y_reset = mamba_chunk_scan_combined(tensors["x"], tensors["dt"], tensors["A"], tensors["B"],
                                        tensors["C"], 8, tensors["D"], tensors["z"],
                                        tensors["dt_bias"], tensors["initial_states"],
                                        dt_softplus=True, reset=reset)
    y_none = mamba_chunk_scan_combined(tensors["x"], tensors["dt"], tensors["A"], tensors["B"],
                                       tensors["C"], 8, tensors["D"], tensors["z"],
                                       tensors["dt_bias"], None, dt_softplus=True)
    torch.testing.assert_close(y_reset, y_none, rtol=0, atol=0)


def test_seq_idx_means_documents_like_reset():
    tensors, _ = make_inputs(initial=False, resets=False)
    seq_idx = torch.tensor([[0] * 7 + [1] * 9 + [2] * 5, [3] * 12 + [4] * 9], dtype=torch.int32)
    reset = torch.zeros(2, 21, dtype=torch.bool)
    reset[0, 7] = reset[0, 16] = reset[1, 12] = True
    args = (tensors["x"], tensors["dt"], tensors["A"], tensors["B"], tensors["C"], 8,
            tensors["D"], tensors["z"], tensors["dt_bias"])
    torch.testing.assert_close(mamba_chunk_scan_combined(*args, None, seq_idx, dt_softplus=True),
                               mamba_chunk_scan_combined(*args, dt_softplus=True, reset=reset),
                               rtol=0, atol=0)


def test_documents_in_one_row_equal_the_documents_apart():
    tensors, _ = make_inputs(batch=1, length=20, initial=False, resets=False)
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 11] = True

    def run(sl, reset=None):
        t = {k: (v[:, sl] if k in ("x", "dt", "B", "C", "z") else v) for k, v in tensors.items()}
        return mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, t["D"],
                                         t["z"], t["dt_bias"], dt_softplus=True, reset=reset)

    packed = run(slice(None), reset)
    apart = torch.cat([run(slice(0, 11)), run(slice(11, 20))], dim=1)
    torch.testing.assert_close(packed, apart, **TOL)


def test_state_step_continues_the_scan():
    """Scan of L-1 positions, then one step from its final state, equals the scan of L."""
    tensors, _ = make_inputs(resets=False)
    t = tensors
    full = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, t["D"], t["z"],
                                     t["dt_bias"], t["initial_states"], dt_softplus=True,
                                     dt_limit=(0.05, 0.5))
    head, state = mamba_chunk_scan_combined(
        t["x"][:, :-1], t["dt"][:, :-1], t["A"], t["B"][:, :-1], t["C"][:, :-1], 8, t["D"],
        t["z"][:, :-1], t["dt_bias"], t["initial_states"], dt_softplus=True,
        dt_limit=(0.05, 0.5), return_final_states=True)
    y, new_state = ssd_state_step(state, t["x"][:, -1], t["dt"][:, -1], t["A"], t["B"][:, -1],
                                  t["C"][:, -1], t["D"], t["z"][:, -1], t["dt_bias"],
                                  dt_softplus=True, dt_limit=(0.05, 0.5))
    torch.testing.assert_close(torch.cat([head, y[:, None]], 1), full, **TOL)
    assert new_state.dtype == torch.float32


def test_state_stays_fp32_under_autocast_and_output_keeps_the_input_dtype():
    tensors, reset = make_inputs()
    t = {k: v.bfloat16() for k, v in tensors.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, last = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, t["D"],
                                            t["z"], t["dt_bias"], t["initial_states"],
                                            dt_softplus=True, return_final_states=True,
                                            reset=reset)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    # fp32 math on bf16-rounded inputs: the only error left is y's final rounding to bf16.
    y_ref, _ = naive_ssd(**{k: v.double() for k, v in t.items()}, dt_softplus=True, reset=reset)
    torch.testing.assert_close(y.double(), y_ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.zeros(2, 21, 12)), "x must be"),
    (dict(A=torch.zeros(4, 5)), "A must be"),
    (dict(B=torch.zeros(2, 21, 3, 5), C=torch.zeros(2, 21, 3, 5)), "multiple of groups"),
    (dict(D=torch.zeros(5)), "D must be"),
    (dict(cu_seqlens=torch.tensor([0, 21])), "cu_seqlens"),
    (dict(seq_idx=torch.zeros(2, 21, dtype=torch.long), reset=torch.zeros(2, 21, dtype=torch.bool)),
     "both seq_idx and reset"),
    (dict(reset=torch.zeros(2, 21)), "reset must be a bool"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_wrong_layouts_fail_naming_the_argument(bad, match):
    tensors, _ = make_inputs(resets=False)
    kwargs = dict(tensors, chunk_size=8)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        mamba_chunk_scan_combined(**kwargs)
