"""The Triton selective scan against `mamba_ft.ops.reference.selective_scan`, outputs and gradients.

Without a GPU the kernels run under TRITON_INTERPRET=1 (numpy, one program at a time) on tiny
shapes, in a child pytest process (see kernel_interpreter.py for why); with one they run
compiled, in this process, and the `gpu` tests add real shapes and bf16.

Tolerances: fp32 rtol 6e-4 / atol 2e-3 (mamba_ssm's own test tolerances; the kernel and the
reference differ only in summation order: parallel scan over time, fp32 atomics for dB/dC).
bf16 rtol 3e-2 / atol 5e-2: both sides compute in fp32 from the same bf16 inputs, so the gap
is the final bf16 rounding of outputs and gradients plus accumulation order.
"""

from __future__ import annotations

import pytest
import torch
from kernel_interpreter import DEVICE, IN_PROCESS, in_process, run_file_under_interpreter

from mamba_ft.ops import reference

if IN_PROCESS:
    from mamba_ft.kernels.selective_scan import selective_scan_fn

FP32 = dict(rtol=6e-4, atol=2e-3)
BF16 = dict(rtol=3e-2, atol=5e-2)
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make_inputs(batch, d, L, N, dtype=torch.float32, *, D=True, z=True, bias=True, h0=True,
                reset=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dt)

    inputs = dict(
        u=rnd(batch, d, L),
        delta=rnd(batch, d, L, scale=0.5),
        # Decays spread over a realistic range: A = -exp(A_log) with A_log in [-1, 1.5].
        A=-torch.exp(torch.rand(d, N, generator=g) * 2.5 - 1).to(DEVICE),
        B=rnd(batch, N, L),
        C=rnd(batch, N, L),
        D=rnd(d, dt=torch.float32) if D else None,
        z=rnd(batch, d, L) if z else None,
        delta_bias=rnd(d, scale=0.5, dt=torch.float32) if bias else None,
        initial_state=rnd(batch, d, N, dt=torch.float32) if h0 else None,
    )
    for t in inputs.values():
        if t is not None:
            t.requires_grad_(True)
    starts = None
    if reset:
        starts = torch.rand(batch, L, generator=g) < 0.08
        starts[:, 0] = True  # also checks that a start at 0 drops the initial state
        starts = starts.to(DEVICE)
    return inputs, starts


def run_both(inputs, starts, softplus=True, last=True):
    """Outputs and gradients (w.r.t. every given input) of kernel and reference."""
    results = []
    for fn in (selective_scan_fn, reference.selective_scan):
        out = fn(**inputs, delta_softplus=softplus, reset=starts, return_last_state=last)
        y, h = out if last else (out, None)
        g = torch.Generator().manual_seed(123)
        loss = (y.float() * torch.randn(y.shape, generator=g).to(DEVICE)).sum()
        if h is not None:
            loss = loss + (h * torch.randn(h.shape, generator=g).to(DEVICE)).sum()
        names = [n for n in NAMES if inputs[n] is not None]
        grads = torch.autograd.grad(loss, [inputs[n] for n in names])
        results.append((y, h, dict(zip(names, grads))))
    return results


def assert_match(results, tol):
    (y, h, grads), (y_ref, h_ref, grads_ref) = results
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    if h_ref is not None:
        torch.testing.assert_close(h, h_ref, **tol)
    for name, g_ref in grads_ref.items():
        g = grads[name]
        assert g.dtype == g_ref.dtype, name
        torch.testing.assert_close(g.float(), g_ref.float(), **tol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


# Tiny shapes for the interpreter: d odd, L=1, N not a power of two, and (with max_chunk 32)
# several chunks with a partial last one, so the carries between chunks are checked too.
CPU_CASES = [
    # (batch, d, L, N, options)
    pytest.param(2, 5, 70, 4, dict(reset=True), id="all-options-reset-N4"),
    pytest.param(1, 3, 1, 16, dict(D=False, z=False, bias=False, h0=False), id="L1-bare-N16"),
    pytest.param(1, 3, 40, 64, dict(z=False, h0=False), id="N64-noz"),
    pytest.param(2, 3, 33, 5, dict(D=False, bias=False), id="N5-not-pow2"),
]


@pytest.fixture(params=[(32, 1), (32, 2), None],
                ids=["chunk32", "chunk32-bwd-halves", "default-chunk"])
def max_chunk(request, monkeypatch):
    """Run with the kernel's longest chunk lowered to 32 positions (the backward walking whole
    chunks, or halves from mid-chunk checkpoints), and with the defaults."""
    if request.param is not None:
        from mamba_ft.kernels import selective_scan as scan_module

        chunk, split = request.param
        monkeypatch.setattr(scan_module, "MAX_CHUNK", chunk)
        monkeypatch.setattr(scan_module, "BWD_SPLIT", split)
    return request.param


@in_process
@pytest.mark.parametrize("batch,d,L,N,opts", CPU_CASES)
def test_scan_fp32_matches_reference(batch, d, L, N, opts, max_chunk):
    inputs, starts = make_inputs(batch, d, L, N, **opts)
    assert_match(run_both(inputs, starts), FP32)


@in_process
def test_scan_without_softplus_or_last_state():
    inputs, starts = make_inputs(2, 3, 20, 4, bias=False, h0=False)
    assert_match(run_both(inputs, starts, softplus=False, last=False), FP32)


@in_process
def test_reset_isolates_documents():
    """Two documents packed in one row give exactly what each gives alone."""
    inputs, _ = make_inputs(1, 3, 24, 4, h0=False)
    starts = torch.zeros(1, 24, dtype=torch.bool, device=DEVICE)
    starts[0, 10] = True
    with torch.no_grad():
        packed = selective_scan_fn(**inputs, delta_softplus=True, reset=starts)
        second = {k: (v[..., 10:] if k in ("u", "delta", "B", "C", "z") else v)
                  for k, v in inputs.items()}
        alone = selective_scan_fn(**second, delta_softplus=True)
    torch.testing.assert_close(packed[..., 10:], alone, **FP32)


@in_process
def test_saved_state_is_per_chunk_not_per_position(monkeypatch):
    """The backward keeps the inputs plus one fp32 state per chunk boundary, not per position."""
    from mamba_ft.kernels import selective_scan as scan_module

    monkeypatch.setattr(scan_module, "MAX_CHUNK", 32)
    monkeypatch.setattr(scan_module, "BWD_SPLIT", 2)
    batch, d, L, N = 1, 2, 130, 4
    inputs, _ = make_inputs(batch, d, L, N, h0=False)
    y = selective_scan_fn(**inputs, delta_softplus=True)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    input_ptrs = {t.data_ptr() for t in inputs.values() if t is not None}
    extra = sum(t.numel() for t in saved if t.data_ptr() not in input_ptrs and t.dim() == 4)
    # 5 chunks of 32, checkpointed at each half (the backward's chunks of 16): at most 10
    # boundary states per (channel, state), not 130.
    assert 0 < extra <= batch * d * N * (-(-L // 16) + 1)


@in_process
def test_positional_call_in_mamba_ssm_order():
    """mamba_ssm's positional order (..., delta_softplus, return_last_state) means the same
    here, through the public drop-in, and a grouped (batch, 1, N, L) B/C equals (batch, N, L)."""
    from mamba_ft.kernels import selective_scan_fn as drop_in

    inputs, _ = make_inputs(2, 3, 20, 4, h0=False)
    u, delta, A, B, C, D, z, bias = (inputs[n] for n in NAMES[:8])
    with torch.no_grad():
        y, last = drop_in(u, delta, A, B, C, D, z, bias, True, True)
        y_ref, last_ref = reference.selective_scan(u, delta, A, B, C, D, z, bias, True, True)
        y_grouped = drop_in(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, bias, True)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(last, last_ref, **FP32)
    torch.testing.assert_close(y_grouped, y_ref, **FP32)
    with pytest.raises(TypeError):  # mamba-ft's additions are keyword-only
        drop_in(u, delta, A, B, C, D, z, bias, True, True, None)


@in_process
@pytest.mark.parametrize("layout,match", [
    ("B_input_independent", "input-independent"),
    ("C_two_groups", "2 groups"),
    ("A_complex", "complex A"),
    ("reset_not_bool", "reset must be a bool"),
])
def test_layouts_mamba_ssm_accepts_are_refused_clearly(layout, match):
    """Layouts mamba_ssm takes and mamba-ft does not: a ValueError naming the argument, from
    the kernel and the reference alike, before any launch."""
    from mamba_ft.kernels import selective_scan_fn as drop_in

    inputs, _ = make_inputs(2, 4, 12, 4, h0=False)
    args = {n: inputs[n].detach() for n in NAMES[:8]}
    reset = None
    if layout == "B_input_independent":
        args["B"] = torch.randn(4, 4, device=DEVICE)
    elif layout == "C_two_groups":
        args["C"] = torch.randn(2, 2, 4, 12, device=DEVICE)
    elif layout == "A_complex":
        args["A"] = torch.complex(args["A"], args["A"])
    else:
        reset = torch.zeros(2, 12, dtype=torch.int64, device=DEVICE)
    for fn in (drop_in, reference.selective_scan):
        with pytest.raises(ValueError, match=match):
            fn(*args.values(), True, reset=reset)


@in_process
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
@pytest.mark.parametrize("batch,d,L,N,opts", [
    (2, 256, 2048, 16, dict()),
    (1, 97, 1000, 64, dict(reset=True)),
    (3, 64, 129, 4, dict(reset=True, D=False)),
])
def test_scan_gpu_real_shapes(dtype, tol, batch, d, L, N, opts):
    inputs, starts = make_inputs(batch, d, L, N, dtype, **opts)
    assert_match(run_both(inputs, starts), tol)


@pytest.mark.gpu
def test_scan_gpu_mixer_layout():
    """Strided (batch, L, d)-major views, as the mixer passes them, give the same result."""
    batch, d, L, N = 2, 192, 300, 16
    inputs, _ = make_inputs(batch, d, L, N, torch.bfloat16)
    strided = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                   if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()}
    assert strided["u"].stride(1) == 1
    assert_match(run_both(strided, None), BF16)


@pytest.mark.skipif(IN_PROCESS, reason="the tests above run in this process")
def test_kernels_under_interpreter_subprocess():
    run_file_under_interpreter(__file__)


def test_kernel_and_reference_take_the_same_arguments():
    """One argument list: the reference's signature (less its chunk_size tuning knob) is the
    kernel's, so the dispatcher and the drop-in forward calls unchanged to either."""
    import ast
    import inspect
    from pathlib import Path

    kernel_file = Path(reference.__file__).resolve().parents[2] / "kernels" / "triton" / "selective_scan.py"
    kernel_def = next(node for node in ast.parse(kernel_file.read_text()).body
                      if isinstance(node, ast.FunctionDef) and node.name == "selective_scan_fn")
    kernel_args = kernel_def.args
    kernel = ([a.arg for a in kernel_args.args], [a.arg for a in kernel_args.kwonlyargs])
    params = inspect.signature(reference.selective_scan).parameters.values()
    ref = ([p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD],
           [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "chunk_size"])
    assert kernel == ref
