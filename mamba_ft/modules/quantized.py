"""Reading bitsandbytes-quantised Linear weights the way the mixer's GEMMs want them.

A quantised projection stays a bitsandbytes module (`Linear4bit` with a `Params4bit`, or
`Linear8bitLt` with an `Int8Params`): its state dict, `save_pretrained` and the memory it holds
are bitsandbytes' own. The mixer never calls such a module's forward (it reads weights and runs
its own GEMMs, `mamba_ft.ops.projections`), so this module turns one into what those GEMMs read:

- `projection_weight(linear)`: in_proj / out_proj. A plain Linear gives its weight; a quantised
  one gives a `BnbWeight`, which the GEMM dequantises into the compute dtype when it runs (and
  again in the backward), so the full-precision matrix exists only during its own GEMM.
- `dense_weight(linear)`: x_proj / dt_proj (small, read whole by the kernels and by adapters'
  effective weights). A quantised one (only from a pre-quantised checkpoint) is dequantised at
  once.
- `dequantized_weight(linear)`: the full matrix, for merging and for tests.

bitsandbytes is imported only when a model holds one of its modules; `is_quantized` recognises
them without importing it.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn


def _bnb():
    import bitsandbytes

    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit Linear (checked without importing bitsandbytes:
    a model can only hold its modules once it has been imported)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantization_kind(module: nn.Module) -> str | None:
    """'nf4', 'fp4' or 'int8' for a quantised Linear, None for a plain one."""
    if not is_quantized(module):
        return None
    bnb = sys.modules["bitsandbytes"]
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return _quant_state(module).quant_type


def _quant_state(module: nn.Module):
    # bitsandbytes keeps the state on the parameter and, as a fallback it restores from, on the
    # module (a parameter rebuilt by e.g. `.to()` loses its attribute).
    state = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} has no quantisation state: its weight was never "
                           f"quantised (bitsandbytes quantises on the first .to(device)).")
    return state


def _int8_row_scales(module: nn.Module, device: torch.device) -> torch.Tensor:
    # Before the module's first forward the row scales sit on the weight; bitsandbytes' forward
    # (init_8bit_state) moves them into module.state. Either place is valid.
    on_weight = getattr(module.weight, "SCB", None) is not None
    scb = module.weight.SCB if on_weight else module.state.SCB
    if scb is None:
        raise RuntimeError("Linear8bitLt has no row scales (SCB): its weight was never quantised "
                           "(bitsandbytes quantises on the first .to(device)).")
    if scb.device != device:
        # bitsandbytes 0.50 moves an already quantised Int8Params' matrix with the module but
        # leaves its row scales where they were (a model quantised on the CPU, then moved to
        # the GPU by Accelerate): move them once, where they are kept.
        scb = scb.to(device)
        if on_weight:
            module.weight.SCB = scb
        else:
            module.state.SCB = scb
    return scb


def _unpack_cpu_layout(module: nn.Module) -> None:
    # bitsandbytes' own Linear4bit.forward may repack the weight for its CPU inference kernel
    # (eval mode, AVX512-BF16 CPUs); dequantize_4bit reads the standard layout, so undo that in
    # place, as bitsandbytes' own state-dict saving does.
    state = getattr(module.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, state)


def _dequantize_4bit_flat(bnb, data: torch.Tensor, state) -> torch.Tensor:
    # bitsandbytes quantises a matrix as one flat run of blocks, but its 0.50 CPU kernel
    # dequantises a 2-D shape row by row, so rows that are not a whole number of blocks come
    # back scrambled (tests/adapters/test_mamba2_qlora.py shows it on 32-wide rows). Asking for
    # the flat tensor and reshaping gives the same values on every backend.
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bnb.functional.dequantize_4bit(data, flat).reshape(state.shape)


@torch.no_grad()
def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out, in) matrix a quantised Linear represents, in `dtype` (default: the dtype it was
    quantised from for 4-bit, fp32 for int8), with no gradient: the base is frozen."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear8bitLt):
        CB = module.weight.data if module.weight.data.dtype == torch.int8 else module.state.CB
        w = bnb.functional.int8_vectorwise_dequant(CB, _int8_row_scales(module, CB.device))
    else:
        _unpack_cpu_layout(module)
        w = _dequantize_4bit_flat(bnb, module.weight.data, _quant_state(module))
    return w if dtype is None else w.to(dtype)


class BnbWeight:
    """A quantised Linear's weight as the projections' GEMMs take it (ops.projections'
    `QuantizedWeight`): the shape of the logical matrix, dequantised on request."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.shape = torch.Size((module.out_features, module.in_features))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantized_weight(self.module, dtype)

    def __repr__(self) -> str:
        return f"BnbWeight({quantization_kind(self.module)}, {tuple(self.shape)})"


def projection_weight(linear: nn.Module):
    """in_proj / out_proj: the weight tensor, or a `BnbWeight` dequantised inside the GEMM."""
    return BnbWeight(linear) if is_quantized(linear) else linear.weight


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """x_proj / dt_proj: the weight tensor itself, or the dequantised matrix of a quantised one
    (in the dtype it was quantised from, as an unquantised weight would be)."""
    return dequantized_weight(linear) if is_quantized(linear) else linear.weight


def logical_numel(module: nn.Module, name: str, param: torch.Tensor) -> int:
    """Elements of the matrix `param` stands for: a 4-bit weight packs two per byte, so its
    own numel() is half of it."""
    if name == "weight" and is_quantized(module):
        return module.out_features * module.in_features
    return param.numel()
