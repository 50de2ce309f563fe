"""The Triton Mamba-2 SSD scan against `mamba_ft.ops.ssd_reference`: outputs, final states and
every gradient (x, dt, A, B, C, D, z, dt_bias, initial_states).

Without a GPU the kernels run under TRITON_INTERPRET=1 on tiny shapes, in a child pytest
process (kernel_interpreter.py says why); with one they run compiled in this process, and the
`gpu` tests add real shapes.

Tolerances:
- fp32: rtol 6e-4 / atol 2e-3 (as the Mamba-1 scan's tests). Both sides compute in fp32 with
  IEEE products; they differ in summation order and in how the segment sums are formed (the
  kernel as differences of chunk cumsums, the reference term by term), which at these
  decays moves results by ~1e-6 relative.
- bf16 / fp16: rtol 2e-2, atol 2e-2 x the tensor's largest reference magnitude. Both sides
  start from the same low-precision inputs and the reference then runs in fp32, while the
  kernel rounds its fp32 decay-weighted matrices to the input dtype for each tl.dot (as
  mamba_ssm does), so its error is a few bf16 roundings (2^-8) of terms summed over a chunk;
  scaling atol to the tensor keeps the check meaningful for gradients that are large sums
  (dA, d dt_bias) and for small ones alike. mamba_ssm's own test uses rtol 1e-2 / atol 3e-3
  on inputs scaled to |y| ~ 1.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from kernel_interpreter import DEVICE, IN_PROCESS, in_process, run_file_under_interpreter

from mamba_ft.ops import ssd_reference

if IN_PROCESS:
    from mamba_ft.kernels.ssd import mamba_chunk_scan_combined

FP32 = dict(rtol=6e-4, atol=2e-3)
LOW_PRECISION_RTOL, LOW_PRECISION_ATOL_SCALE = 2e-2, 2e-2
NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
NO_LIMIT = (0.0, math.inf)
MAMBA_SSM_SRC = Path(__file__).resolve().parents[2] / ".mamba_ssm_src"


def make_inputs(batch, L, heads, head_dim, groups, N, dtype=torch.float32, *, D="heads", z=True,
                bias=True, h0=True, seed=0):
    """Inputs at Mamba-2's scales: dt around softplus(N(0, 0.5) + bias), A = -exp(U(-1, 1.5))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dt)

    inputs = dict(
        x=rnd(batch, L, heads, head_dim),
        dt=rnd(batch, L, heads, scale=0.5),
        A=-torch.exp(torch.rand(heads, generator=g) * 2.5 - 1).to(DEVICE),
        B=rnd(batch, L, groups, N, scale=0.5),
        C=rnd(batch, L, groups, N, scale=0.5),
        D={"heads": rnd(heads, dt=torch.float32), "channels": rnd(heads, head_dim, dt=torch.float32),
           None: None}[D],
        z=rnd(batch, L, heads, head_dim) if z else None,
        dt_bias=rnd(heads, scale=0.5, dt=torch.float32) if bias else None,
        initial_states=rnd(batch, heads, head_dim, N, dt=torch.float32) if h0 else None,
    )
    for t in inputs.values():
        if t is not None:
            t.requires_grad_(True)
    return inputs


def starts_at(batch, L, positions):
    """A (batch, L) reset mask with document starts at `positions` (row 0; row 1, if any,
    also starts one at 0, which must drop the initial state)."""
    reset = torch.zeros(batch, L, dtype=torch.bool)
    for p in positions:
        if p < L:
            reset[0, p] = True
    if batch > 1:
        reset[1, 0] = True
        reset[1, L // 2] = True
    return reset.to(DEVICE)


def run_both(inputs, chunk, *, softplus=True, dt_limit=NO_LIMIT, reset=None, seq_idx=None,
             final=True):
    """(y, final state, {name: grad}) of the kernel and of the reference, from one loss that
    weights y and the final state by fixed random tensors."""
    results = []
    for fn in (mamba_chunk_scan_combined, ssd_reference.mamba_chunk_scan_combined):
        out = fn(*(inputs[n] for n in NAMES[:5]), chunk, inputs["D"], inputs["z"],
                 inputs["dt_bias"], inputs["initial_states"], seq_idx, None, softplus, dt_limit,
                 final, reset=reset)
        y, h = out if final else (out, None)
        g = torch.Generator().manual_seed(123)
        loss = (y.float() * torch.randn(y.shape, generator=g).to(DEVICE)).sum()
        if h is not None:
            loss = loss + (h * torch.randn(h.shape, generator=g).to(DEVICE)).sum()
        names = [n for n in NAMES if inputs[n] is not None]
        grads = torch.autograd.grad(loss, [inputs[n] for n in names])
        results.append((y, h, dict(zip(names, grads))))
    return results


def _close(actual, expected, name, tol):
    if tol is None:  # low precision: atol scaled to the tensor
        atol = LOW_PRECISION_ATOL_SCALE * expected.float().abs().max().item() + 1e-6
        tol = dict(rtol=LOW_PRECISION_RTOL, atol=atol)
    torch.testing.assert_close(actual.float(), expected.float(), **tol,
                               msg=lambda m: f"{name}: {m}")


def assert_match(results, tol):
    (y, h, grads), (y_ref, h_ref, grads_ref) = results
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    _close(y, y_ref, "y", tol)
    if h_ref is not None:
        assert h.dtype == torch.float32
        _close(h, h_ref, "final state", tol)
    assert grads.keys() == grads_ref.keys()
    for name, g_ref in grads_ref.items():
        assert grads[name].dtype == g_ref.dtype, name
        _close(grads[name], g_ref, f"grad {name}", tol)


@pytest.fixture(params=["default", "small-blocks"])
def tuning(request, monkeypatch):
    """The shipped tuning, and one with 16-position sub-blocks (several per chunk), the
    backward's heads never split (each program loops over its group's heads) and states
    split into 16 x 16 tiles."""
    if request.param == "small-blocks":
        from mamba_ft.kernels import ssd as ssd_module

        monkeypatch.setattr(ssd_module, "BLOCK_T_MAX", 16)
        monkeypatch.setattr(ssd_module, "MIN_PROGRAMS", 1)
        monkeypatch.setattr(ssd_module, "STATE_PASS_BLOCK", 128)
        monkeypatch.setattr(ssd_module, "STATE_TILE_MAX", (16, 16))
    return request.param


# Tiny shapes for the interpreter (tl.dot tiles are at least 16 wide; smaller head_dim / N are
# masked). Resets inside a chunk and exactly at chunk boundaries (16, 32 with chunk 16).
CPU_CASES = [
    # (batch, L, heads, head_dim, groups, N, chunk, input options, call options)
    pytest.param(2, 37, 4, 16, 2, 16, 16, dict(), dict(reset=[5, 16, 32], dt_limit=(0.05, 1.5)),
                 id="all-options-resets-limit"),
    pytest.param(1, 1, 2, 16, 1, 16, 16, dict(D=None, z=False, bias=False, h0=False),
                 dict(softplus=False, final=False), id="L1-bare"),
    pytest.param(1, 50, 4, 8, 1, 20, 24, dict(D="channels", z=False), dict(reset=[24]),
                 id="chunk24-L50-D-per-channel"),
    pytest.param(2, 40, 4, 16, 4, 16, 32, dict(h0=False), dict(), id="groups-eq-heads"),
]


@in_process
@pytest.mark.parametrize("batch,L,heads,head_dim,groups,N,chunk,in_opts,call_opts", CPU_CASES)
def test_ssd_fp32_matches_reference(batch, L, heads, head_dim, groups, N, chunk, in_opts,
                                    call_opts, tuning):
    inputs = make_inputs(batch, L, heads, head_dim, groups, N, **in_opts)
    call_opts = dict(call_opts)
    if "reset" in call_opts:
        call_opts["reset"] = starts_at(batch, L, call_opts["reset"])
    assert_match(run_both(inputs, chunk, **call_opts), FP32)


@in_process
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ssd_low_precision_matches_reference(dtype):
    inputs = make_inputs(2, 40, 4, 16, 2, 16, dtype)
    results = run_both(inputs, 16, reset=starts_at(2, 40, [7, 16]), dt_limit=(0.0, 2.0))
    assert results[0][0].dtype == dtype
    assert_match(results, None)


@in_process
def test_heads_split_over_programs_in_pairs(monkeypatch):
    """The backward's per-group kernels with each group's 4 heads split over 2 programs (2
    heads each, two dB/dC partials summed), between the fixture's 1 and 4 heads a program."""
    from mamba_ft.kernels import ssd as ssd_module

    monkeypatch.setattr(ssd_module, "_head_splits", lambda heads_per_group, base: 2)
    inputs = make_inputs(2, 40, 8, 16, 2, 16)
    assert_match(run_both(inputs, 16, reset=starts_at(2, 40, [20])), FP32)


@in_process
@pytest.mark.parametrize("splits", [2, 4])
def test_heads_split_with_several_sub_blocks(monkeypatch, splits):
    """Split heads with three 16-position sub-blocks per chunk: the per-group dCB kernel's
    off-diagonal block pairs with their per-head pair sums, each split's dCB partial, and the
    dB / dC kernels' blocks dealt out over the splits (with 4 splits some get no block, only
    their heads' state terms). L = 70 leaves a partial last chunk with an empty block."""
    from mamba_ft.kernels import ssd as ssd_module

    monkeypatch.setattr(ssd_module, "BLOCK_T_MAX", 16)
    monkeypatch.setattr(ssd_module, "_head_splits", lambda heads_per_group, base: splits)
    inputs = make_inputs(2, 70, 4, 16, 1, 16, D="channels")
    assert_match(run_both(inputs, 48, reset=starts_at(2, 70, [21, 48])), FP32)


@in_process
def test_ssd_bf16_at_mamba2_head_size():
    """Mamba-2's per-head sizes (head_dim 64, N 128, chunk 256: the shipped 64-position
    sub-blocks, 4 per chunk) in bf16, two chunks, resets inside the first and at the second."""
    inputs = make_inputs(1, 512, 4, 64, 1, 128, torch.bfloat16, z=False)
    assert_match(run_both(inputs, 256, reset=starts_at(1, 512, [100, 256]), dt_limit=(0.0, 2.0)),
                 None)


@in_process
def test_seq_idx_equals_reset():
    """seq_idx (document ids) means the same as the reset mask where the id changes."""
    inputs = make_inputs(2, 30, 2, 16, 1, 16, h0=False)
    seq_idx = torch.tensor([[0] * 9 + [1] * 7 + [2] * 14, [3] * 16 + [4] * 14], device=DEVICE)
    reset = torch.zeros(2, 30, dtype=torch.bool, device=DEVICE)
    reset[0, 9] = reset[0, 16] = reset[1, 16] = True
    by_ids = run_both(inputs, 16, seq_idx=seq_idx)
    by_reset = run_both(inputs, 16, reset=reset)
    assert_match(by_ids, FP32)
    torch.testing.assert_close(by_ids[0][0], by_reset[0][0], rtol=0, atol=0)
    for name, grad in by_ids[0][2].items():
        torch.testing.assert_close(grad, by_reset[0][2][name], rtol=0, atol=0)


@in_process
def test_reset_isolates_documents():
    """Two documents packed in one row (the second starting mid-chunk) give what the second
    gives alone: the initial state and the first document reach nothing after the reset."""
    inputs = make_inputs(1, 40, 2, 16, 1, 16, z=False)
    reset = starts_at(1, 40, [19])

    def args(positions):
        x, dt, B, C = (inputs[n][:, positions] for n in ("x", "dt", "B", "C"))
        return x, dt, inputs["A"], B, C
    with torch.no_grad():
        packed = mamba_chunk_scan_combined(*args(slice(None)), 16, inputs["D"], None,
                                           inputs["dt_bias"], inputs["initial_states"],
                                           dt_softplus=True, reset=reset)
        alone = mamba_chunk_scan_combined(*args(slice(19, None)), 16, inputs["D"], None,
                                          inputs["dt_bias"], dt_softplus=True)
    torch.testing.assert_close(packed[:, 19:], alone, **FP32)


@in_process
def test_saved_state_is_per_chunk_not_per_position():
    """Besides its inputs, the backward keeps fp32 dt/cumsum (batch, heads, L) and one state
    per chunk, not one per position."""
    batch, L, heads, P, N, chunk = 1, 64, 2, 16, 16, 16
    inputs = make_inputs(batch, L, heads, P, 1, N, z=False, h0=False)
    y = mamba_chunk_scan_combined(*(inputs[n] for n in NAMES[:5]), chunk, inputs["D"],
                                  dt_bias=inputs["dt_bias"], dt_softplus=True)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    input_ptrs = {t.data_ptr() for t in inputs.values() if t is not None}
    extra = sum(t.numel() for t in saved if t.data_ptr() not in input_ptrs)
    n_chunks = L // chunk
    assert extra <= n_chunks * batch * heads * P * N + 2 * batch * heads * L + heads + 2 * heads


@in_process
def test_public_drop_in_and_layout_errors():
    """`mamba_ft.kernels.mamba_chunk_scan_combined` is the kernel (mamba_ssm's positional
    order), and a bad layout fails with the shared ValueError before any launch."""
    from mamba_ft.kernels import mamba_chunk_scan_combined as drop_in

    inputs = make_inputs(1, 20, 2, 16, 1, 16, z=False, h0=False)
    args = [inputs[n].detach() for n in NAMES[:5]]
    with torch.no_grad():
        y = drop_in(*args, 16, inputs["D"], None, inputs["dt_bias"], None, None, None, True)
        y_ref = ssd_reference.mamba_chunk_scan_combined(*args, 16, inputs["D"], None,
                                                        inputs["dt_bias"], dt_softplus=True)
    torch.testing.assert_close(y, y_ref, **FP32)
    with pytest.raises(ValueError, match="heads .* multiple of groups"):
        drop_in(args[0], args[1], args[2], torch.randn(1, 20, 3, 16, device=DEVICE),
                torch.randn(1, 20, 3, 16, device=DEVICE), 16)


def _load_ssd_minimal():
    """mamba_ssm's `ssd_minimal_discrete` (the paper's listing), loaded from the unpacked
    source tree by path. Its module imports mamba_ssm's Triton SSD at the top for an unrelated
    test helper; a stub stands in for that module, so nothing of mamba_ssm but the listing
    runs. None if the tree or einops is missing."""
    path = MAMBA_SSM_SRC / "mamba_ssm" / "modules" / "ssd_minimal.py"
    if not path.exists() or importlib.util.find_spec("einops") is None:
        return None
    stub = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
    stub.mamba_chunk_scan_combined = None
    saved = {k: sys.modules.get(k) for k in ("mamba_ssm.ops.triton.ssd_combined",)}
    sys.modules["mamba_ssm.ops.triton.ssd_combined"] = stub
    try:
        spec = importlib.util.spec_from_file_location("_mamba_ssm_ssd_minimal", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module.ssd_minimal_discrete


@in_process
def test_matches_mamba_ssm_minimal_listing():
    """A second oracle, written independently of the reference: mamba_ssm's
    `ssd_minimal_discrete` on discretised inputs (X = x dt, A_t = A dt, B/C per head), output
    and final state, from an initial state, at a length that is a multiple of the chunk."""
    ssd_minimal = _load_ssd_minimal()
    if ssd_minimal is None:
        pytest.skip("mamba_ssm source tree (.mamba_ssm_src) or einops not available")
    batch, L, heads, P, groups, N, chunk = 2, 48, 4, 16, 2, 16, 16
    inputs = make_inputs(batch, L, heads, P, groups, N, D=None, z=False, bias=False)
    x, dt, A, B, C, h0 = (inputs[n].detach() for n in ("x", "dt", "A", "B", "C", "initial_states"))
    dt = torch.nn.functional.softplus(dt)
    with torch.no_grad():
        y, last = mamba_chunk_scan_combined(x, dt, A, B, C, chunk, initial_states=h0,
                                            return_final_states=True)
        per_head = lambda t: t.repeat_interleave(heads // groups, dim=2)
        y_min, last_min = ssd_minimal(x * dt[..., None], A * dt, per_head(B), per_head(C), chunk,
                                      initial_states=h0.unsqueeze(1))
    torch.testing.assert_close(y, y_min, **FP32)
    torch.testing.assert_close(last, last_min, **FP32)


# (batch, L, heads, head_dim, groups, N, chunk, input options, reset positions); bf16 on all,
# fp32 on one (its kernels take ~1 min to compile, the IEEE fp32 dots being large).
GPU_CASES = [
    pytest.param(torch.bfloat16, 2, 2048, 24, 64, 1, 128, 256, dict(z=False), None,
                 id="bf16-mamba2-130m-layer"),
    pytest.param(torch.bfloat16, 2, 1000, 8, 64, 2, 64, 128, dict(D="channels"),
                 [100, 128, 700], id="bf16-groups2-resets"),
    pytest.param(torch.float32, 2, 1000, 8, 64, 2, 64, 128, dict(D="channels"),
                 [100, 128, 700], id="fp32-groups2-resets"),
    pytest.param(torch.bfloat16, 1, 300, 6, 32, 3, 128, 256, dict(z=False, bias=False), [256],
                 id="bf16-head_dim32-reset-at-boundary"),
]


@in_process
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,batch,L,heads,head_dim,groups,N,chunk,in_opts,resets",
                         GPU_CASES)
def test_ssd_gpu_real_shapes(dtype, batch, L, heads, head_dim, groups, N, chunk, in_opts, resets):
    inputs = make_inputs(batch, L, heads, head_dim, groups, N, dtype, **in_opts)
    reset = starts_at(batch, L, resets) if resets is not None else None
    assert_match(run_both(inputs, chunk, reset=reset, dt_limit=(0.0, 2.0)),
                 FP32 if dtype == torch.float32 else None)


@pytest.mark.gpu
def test_ssd_gpu_mixer_layout():
    """Strided views of one projection output, as Mamba-2's mixer passes x, B, C and dt."""
    batch, L, heads, P, N = 2, 512, 8, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    zxbcdt = torch.randn(batch, L, heads * P + 2 * N + heads, device="cuda", generator=g,
                         dtype=torch.bfloat16).requires_grad_()
    x, B, C, dt = torch.split(zxbcdt, [heads * P, N, N, heads], dim=-1)
    x = x.view(batch, L, heads, P)
    B, C = B.view(batch, L, 1, N), C.view(batch, L, 1, N)
    A = -torch.exp(torch.rand(heads, device="cuda", generator=g))
    grads = []
    for fn in (mamba_chunk_scan_combined, ssd_reference.mamba_chunk_scan_combined):
        y = fn(x, dt, A, B, C, 256, dt_softplus=True)
        grads.append((y, torch.autograd.grad(y.float().square().sum(), zxbcdt)[0]))
    _close(grads[0][0], grads[1][0], "y", None)
    _close(grads[0][1], grads[1][1], "grad of the projection", None)


@pytest.mark.skipif(IN_PROCESS, reason="the tests above run in this process")
def test_kernels_under_interpreter_subprocess():
    run_file_under_interpreter(__file__)


def test_kernel_and_reference_take_the_same_arguments():
    """One argument list: the kernel's signature is the reference's, so a dispatcher forwards
    calls unchanged to either."""
    import ast
    import inspect

    kernel_file = (Path(ssd_reference.__file__).resolve().parents[2] / "kernels" / "triton"
                   / "ssd.py")
    kernel_def = next(node for node in ast.parse(kernel_file.read_text()).body
                      if isinstance(node, ast.FunctionDef)
                      and node.name == "mamba_chunk_scan_combined")
    kernel = ([a.arg for a in kernel_def.args.args], [a.arg for a in kernel_def.args.kwonlyargs])
    params = inspect.signature(ssd_reference.mamba_chunk_scan_combined).parameters.values()
    ref = ([p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD],
           [p.name for p in params if p.kind is p.KEYWORD_ONLY])
    assert kernel == ref
    from mamba_ft.ops import dispatch  # the third spelling, which forwards to either

    params = inspect.signature(dispatch.mamba_chunk_scan_combined).parameters.values()
    assert ([p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD],
            [p.name for p in params if p.kind is p.KEYWORD_ONLY]) == ref
