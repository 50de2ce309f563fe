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
