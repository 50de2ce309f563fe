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

The input embedding may be quantised too (`QuantizedEmbedding`, mamba-ft's own module: bitsandbytes
0.50's Embedding4bit / Embedding8bit cannot write a state dict). Its (vocab, dim) table is a
`Params4bit` (nf4 / fp4) or an `Int8Params` with its row scales in the buffer `SCB`; a lookup
dequantises only the rows it reads. A head tied to that table (Mamba's lm_head) becomes a
`QuantizedTiedHead`: it holds nothing, and its GEMM dequantises the embedding's table as the
projections' GEMMs do (`ops.projections.rows`), so the table exists once, quantised.

bitsandbytes is imported only when a model holds one of its modules; `is_quantized` recognises
them without importing it.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

from mamba_ft.ops.projections import rows


def _bnb():
    import bitsandbytes

    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """True for a module holding bitsandbytes-quantised storage: a bitsandbytes 4-bit or 8-bit
    Linear, or a `QuantizedEmbedding` (checked without importing bitsandbytes: a model can only
    hold its modules once it has been imported). A `QuantizedTiedHead` holds nothing: False."""
    if isinstance(module, QuantizedEmbedding):
        return True
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def logical_shape(module: nn.Module) -> torch.Size:
    """The (out, in) matrix a Linear stands for, or an embedding's (vocab, dim) table."""
    if isinstance(module, QuantizedEmbedding):
        return torch.Size((module.num_embeddings, module.embedding_dim))
    return torch.Size((module.out_features, module.in_features))


def quantization_kind(module: nn.Module) -> str | None:
    """'nf4', 'fp4' or 'int8' for a quantised Linear or embedding, None for a plain one."""
    if not is_quantized(module):
        return None
    if isinstance(module, QuantizedEmbedding):
        return module.kind
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
    quantised from for 4-bit, fp32 for int8), with no gradient: the base is frozen. For a
    `QuantizedEmbedding`, its (vocab, dim) table (default: its compute dtype)."""
    if isinstance(module, QuantizedEmbedding):
        return module.dequantize(dtype)
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear8bitLt):
        CB = module.weight.data if module.weight.data.dtype == torch.int8 else module.state.CB
        w = bnb.functional.int8_vectorwise_dequant(CB, _int8_row_scales(module, CB.device))
    else:
        _unpack_cpu_layout(module)
        w = _dequantize_4bit_flat(bnb, module.weight.data, _quant_state(module))
    return w if dtype is None else w.to(dtype)


class BnbWeight:
    """A quantised Linear's weight (or a quantised embedding's table, as a tied head reads it)
    as the projections' GEMMs take it (ops.projections' `QuantizedWeight`): the shape of the
    logical matrix, dequantised on request."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.shape = logical_shape(module)

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
        return logical_shape(module).numel()
    return param.numel()


class QuantizedEmbedding(nn.Module):
    """An input embedding whose (vocab, dim) table is bitsandbytes storage.

    - nf4 / fp4: `weight` is a `Params4bit`, the table quantised as one flat run of 64-weight
      blocks (as bitsandbytes quantises any matrix), its block scales (double-quantised or not)
      in the parameter's `quant_state`.
    - int8: `weight` is an `Int8Params` (bitsandbytes' row-wise int8, one scale per row) and the
      buffer `SCB` holds the row scales, so `.to(device)` moves them with the table.

    A lookup returns the rows in `compute_dtype` (model.quantize's compute dtype; for 4-bit also
    the dtype the table was quantised from), with no gradient: the table is frozen, and an
    embedding adapter adds to the output through its forward hook. Only the rows read are
    dequantised:
    - int8: the rows and their scales are gathered, then dequantised;
    - 4-bit with `dim` a multiple of the block size (every Mamba's d_model): each row is whole
      blocks, so the rows' packed bytes and block scales are gathered and only those are
      dequantised (double-quantised scales are first dequantised whole: 1/64 of the table);
    - 4-bit otherwise (the tiny test models): rows straddle blocks, so the whole table is
      dequantised (flat, see `_dequantize_4bit_flat`) and indexed.
    At the Mamba-1.4B shape (50280 x 2048, nf4) and 4096 tokens, the rows took 14 ms on a
    2-core CPU and the whole table 105 ms, with a 16 MB instead of a 206 MB bf16 temporary.

    The state dict holds `weight` (the packed table) and bitsandbytes' quantisation state as
    `Linear4bit` writes it (`weight.absmax`, `weight.quant_map`, ...) or `SCB`, and loads back
    into a module of the same kind and shape (bitsandbytes 0.50's Embedding4bit /
    Embedding8bit raise on `state_dict()`).
    """

    def __init__(self, weight: nn.Parameter, kind: str, compute_dtype: torch.dtype,
                 num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 row_scales: torch.Tensor | None = None):
        super().__init__()
        self.kind = kind
        self.compute_dtype = compute_dtype
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx  # kept for the plain nn.Embedding a merge writes back
        self.weight = weight
        self.register_buffer("SCB", row_scales)  # int8's row scales; None (no entry) for 4-bit

    @classmethod
    @torch.no_grad()
    def quantize(cls, table: torch.Tensor, kind: str, compute_dtype: torch.dtype,
                 double_quant: bool = True, padding_idx: int | None = None) -> "QuantizedEmbedding":
        """`table` (vocab, dim) quantised on its own device, as bitsandbytes' Linear4bit /
        Linear8bitLt quantise a matrix of that shape (the same bytes)."""
        bnb = _bnb()
        vocab, dim = table.shape
        table = table.detach()
        if kind == "int8":
            CB, SCB, _ = bnb.functional.int8_vectorwise_quant(table.to(torch.float16).contiguous())
            weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False)
            return cls(weight, kind, compute_dtype, vocab, dim, padding_idx, row_scales=SCB)
        weight = bnb.nn.Params4bit(table.to(compute_dtype).contiguous(), requires_grad=False,
                                   compress_statistics=double_quant, quant_type=kind).to(table.device)
        return cls(weight, kind, compute_dtype, vocab, dim, padding_idx)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole (vocab, dim) table in `dtype` (default: the compute dtype)."""
        bnb = _bnb()
        if self.kind == "int8":
            table = bnb.functional.int8_vectorwise_dequant(self.weight.data, self.SCB)
        else:
            table = _dequantize_4bit_flat(bnb, self.weight.data, self.weight.quant_state)
        return table.to(dtype or self.compute_dtype)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        flat = ids.reshape(-1)
        if flat.numel() == 0:
            return torch.empty(*ids.shape, self.embedding_dim, dtype=self.compute_dtype,
                               device=self.weight.device)
        if self.kind == "int8":
            out = bnb.functional.int8_vectorwise_dequant(self.weight.data[flat], self.SCB[flat])
        else:
            state = self.weight.quant_state
            if self.embedding_dim % state.blocksize:
                return F.embedding(ids, self.dequantize())
            absmax = state.absmax
            if state.nested:  # what dequantize_4bit does with them, for every block at once
                absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
            per_row = self.embedding_dim // state.blocksize
            packed = self.weight.data.view(self.num_embeddings, self.embedding_dim // 2)[flat]
            scales = absmax.float().view(self.num_embeddings, per_row)[flat]
            rows_state = bnb.functional.QuantState(
                absmax=scales.reshape(-1), shape=torch.Size([flat.numel() * self.embedding_dim]),
                code=state.code, blocksize=state.blocksize, quant_type=state.quant_type,
                dtype=state.dtype)
            out = bnb.functional.dequantize_4bit(packed.reshape(-1, 1), rows_state)
        return out.to(self.compute_dtype).view(*ids.shape, self.embedding_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, SCB
        if self.kind != "int8":
            for key, value in self.weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The packed table (and SCB) are copied in place, shapes checked; a 4-bit state's
        # `weight.*` entries rebuild its quant_state (and so are not unexpected keys).
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.kind == "int8" or prefix + "weight" not in state_dict:
            return
        head = prefix + "weight."
        stats = {key[len(head):]: value for key, value in state_dict.items() if key.startswith(head)}
        for key in stats:
            if head + key in unexpected_keys:
                unexpected_keys.remove(head + key)
        if not stats:
            error_msgs.append(f"{prefix}weight has no quantisation state ({head}absmax, ...): it "
                              f"was not saved by a {self.kind} QuantizedEmbedding")
            return
        state = _bnb().functional.QuantState.from_dict(stats, device=self.weight.device)
        if state.quant_type != self.kind or tuple(state.shape) != (self.num_embeddings, self.embedding_dim):
            error_msgs.append(f"{prefix}weight holds a {state.quant_type} table of shape "
                              f"{tuple(state.shape)}, not {self.kind} "
                              f"{(self.num_embeddings, self.embedding_dim)}")
            return
        self.weight.quant_state = state
        self.compute_dtype = state.dtype

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, {self.kind}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")


class QuantizedTiedHead(nn.Module):
    """The output head tied to a `QuantizedEmbedding` (Mamba's lm_head, and Mamba-2's where the
    config ties them): logits = hidden @ tableᵀ in the compute dtype, the table dequantised
    inside the GEMM and again in the backward (for the hidden states' gradient), never saved;
    no gradient reaches it (`ops.projections.rows`, as Mamba-2's quantised projections).

    It holds no tensor: the table is the embedding's, referenced without being registered, so
    the parameters, the state dict and the memory hold it once. `weight` is a stand-in for
    code that reads the head's weight for what it describes (transformers' Mamba casts the
    hidden states to `lm_head.weight.dtype`; mamba-ft's chunked head loss reads its shape):
    the compute dtype, the (vocab, dim) shape and the table's device, and no values, a stride-0
    view of one NaN, so code computing with it instead of calling the head gets NaN rather
    than plausible logits. Assigning a weight to it (tie_weights after quantising) raises.
    """

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: no second copy
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        e = self.embedding
        return torch.full((), float("nan"), dtype=e.compute_dtype,
                          device=e.weight.device).expand(e.num_embeddings, e.embedding_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return rows(hidden, BnbWeight(self.embedding))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, reads the "
                f"{self.embedding.kind} embedding table")
