"""Whether the installed bitsandbytes can quantise a format on this CPU (tests skip, saying why)."""

from __future__ import annotations

import pytest
import torch


def cannot_quantize_here(kind: str) -> str | None:
    """None when bitsandbytes can quantise `kind` on this CPU, else the reason it cannot."""
    bnb = pytest.importorskip("bitsandbytes",
                              reason="bitsandbytes is not installed (pip install 'mamba-ft[qlora]')")
    try:
        probe = torch.randn(8, 64)
        if kind == "int8":
            bnb.functional.int8_vectorwise_quant(probe.half())
        else:
            bnb.functional.quantize_4bit(probe, quant_type=kind)
    except Exception as exc:  # whatever the backend raises
        return f"bitsandbytes {bnb.__version__} cannot quantise {kind} on this CPU: {exc}"
    return None


def needs_quantization(kind: str) -> None:
    """Skip the calling test when `kind` cannot be quantised here."""
    reason = cannot_quantize_here(kind)
    if reason is not None:
        pytest.skip(reason)


def assert_adapter_grads_match_twin(model, twin, rtol: float) -> dict:
    """After a backward through both: every adapter of the quantised `model` has a finite,
    non-zero gradient (the guard passes) equal to the same adapter's in `twin`, the model with
    the dequantised weights in plain modules. Returns the model's adapter gradients by name."""
    from mamba_ft.adapters import adapter_parameters, check_adapter_gradients

    check_adapter_gradients(model)
    ours = {n: p.grad for n, p in adapter_parameters(model).items()}
    theirs = {n: p.grad for n, p in adapter_parameters(twin).items()}
    assert ours.keys() == theirs.keys()
    zero = [n for n, g in ours.items() if g is None or not g.abs().sum() > 0]
    assert not zero, zero
    for name, g in ours.items():
        torch.testing.assert_close(g, theirs[name], rtol=rtol, atol=1e-6, msg=name)
    return ours
