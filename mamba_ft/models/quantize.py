"""4-bit and 8-bit base weights through bitsandbytes (QLoRA): which modules, how, and back.

`model.quantize` in a recipe (`QuantizeConfig`) names the format (`nf4`, `fp4`, `int8`) and
which modules hold it: by default every mixer's `in_proj` and `out_proj` (Mamba-1 and Mamba-2),
the bulk of a Mamba's parameters. x_proj, dt_proj (Mamba-1), conv1d, the norms and the recurrence parameters stay in the
compute dtype (small, read whole by the kernels and by the adapters' effective weights).
`embeddings` may be named too (off by default): the input embedding becomes mamba-ft's
`QuantizedEmbedding` (bitsandbytes 0.50's Embedding4bit/Embedding8bit cannot write a state
dict), and a head tied to it (Mamba's lm_head) a `QuantizedTiedHead` reading the same
quantised table. `lm_head` alone is refused: transformers' `MambaForCausalLM.forward` casts the
hidden states to `lm_head.weight.dtype`, which for a bitsandbytes head is its packed uint8 /
int8 storage (wrong logits and no gradient); an untied head stays in the compute dtype.

The quantised modules are bitsandbytes' own `Linear4bit` (weight a `Params4bit`) and
`Linear8bitLt` (an `Int8Params`), so state dicts, `save_pretrained` and memory are real.
mamba-ft's mixer reads them through `mamba_ft.modules.quantized`: its GEMMs dequantise the
weight into the compute dtype as they run and again in the backward, never storing the full
matrix, and no gradient reaches it. The adapters sit on top exactly as on a full-precision
base.

- `quantize_model(model, config)`: quantise a loaded Mamba in place; returns the report.
- `quantize_transformer(model, config)` (through `quantize_model`): a Transformer baseline's
  Linears, by transformers' own bitsandbytes rule and helper (`replace_with_bnb_linear`): every
  Linear but the output head; `modules` is Mamba-only. PEFT's bitsandbytes LoRA layers train on
  them; merging dequantises them first, as for a Mamba.
- `check_prequantized(...)`: a checkpoint saved quantised (transformers' `quantization_config`)
  must agree with the recipe; transformers' own bitsandbytes loader then reads it.
- `dequantize_model(model)`: plain Linears (and a plain embedding, a tied head) holding the
  dequantised matrices (for merging: the merged weights are the ones the adapters were
  trained against).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from mamba_ft.errors import UserError, did_you_mean
from mamba_ft.models.swap import mixers
from mamba_ft.modules.mamba2_mixer import MambaFTMamba2Mixer
from mamba_ft.modules.mamba_mixer import MambaFTMixer
from mamba_ft.modules.zamba_mixer import MambaFTZambaMixer
from mamba_ft.modules.quantized import (QuantizedEmbedding, QuantizedTiedHead, dequantized_weight,
                                        is_quantized, quantization_kind)

KINDS = ("none", "nf4", "fp4", "int8")
MIXER_MODULES = ("in_proj", "out_proj", "x_proj", "dt_proj")
# Outside the mixers: the input embedding (and with it a head tied to it).
MODEL_MODULES = ("embeddings",)
QUANTIZABLE = MIXER_MODULES + MODEL_MODULES
DEFAULT_MODULES = ["in_proj", "out_proj"]
# The bitsandbytes versions this was tested with (pyproject's `qlora` extra says the same).
TESTED_BITSANDBYTES = ">=0.50,<0.51"
_ATTR = "mamba_ft_quantization"


class QuantizeConfig(BaseModel):
    """The recipe's `model.quantize`: a format name, or a mapping with the options below."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none", description="none, nf4, fp4 (4-bit, QLoRA) or int8 (LLM.int8() row-wise)")
    double_quant: bool | None = Field(
        None, description="4-bit only: quantise the block scales too (about 0.4 bits per "
                          "weight less); default true, or what a pre-quantised checkpoint has")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the dtype the weights are quantised from and dequantised into for "
                            "the GEMMs; auto = precision.mode's (bf16 -> bfloat16, fp16 -> "
                            "float16, fp32 -> float32)")
    modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MODULES),
        description="which modules hold quantised weights: in_proj, out_proj (default), "
                    "x_proj, dt_proj (Mamba-1 only), embeddings (the input embedding; a head "
                    "tied to it reads the same quantised table). Mamba only: leave it out for a "
                    "Transformer baseline (every Linear of its decoder layers is quantised)")

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, value):
        # `model.quantize: nf4` is short for `model.quantize: {kind: nf4}`; null means none.
        if value is None:
            return {"kind": "none"}
        if isinstance(value, str):
            value = {"kind": value}
        if isinstance(value, dict) and isinstance(value.get("kind"), str):
            kind = value["kind"].lower()
            if kind not in KINDS:
                raise ValueError(f"unknown quantisation {value['kind']!r} (choose one of "
                                 f"{', '.join(KINDS)}){did_you_mean(kind, list(KINDS))}")
            value = {**value, "kind": kind}
        return value

    @field_validator("modules")
    @classmethod
    def _known_modules(cls, modules: list[str]) -> list[str]:
        for name in modules:
            if name == "lm_head":
                raise ValueError("lm_head cannot be quantised on its own: transformers' Mamba casts "
                                 "the hidden states to lm_head.weight.dtype, which for a bitsandbytes "
                                 "head is its packed integer storage; name 'embeddings' instead (a "
                                 "head tied to them, as Mamba's is, then reads their quantised table; "
                                 "an untied head stays in the compute dtype) and leave 'lm_head' out")
            if name not in QUANTIZABLE:
                raise ValueError(f"{name!r} cannot be quantised (choose from {', '.join(QUANTIZABLE)})"
                                 f"{did_you_mean(name, list(QUANTIZABLE))}")
        if len(set(modules)) != len(modules) or not modules:
            raise ValueError("name each module once, and at least one")
        return modules

    @model_validator(mode="after")
    def _options_fit_kind(self):
        if self.kind == "int8" and self.double_quant is not None:
            raise ValueError("double_quant applies to the 4-bit formats (nf4, fp4) only; remove it "
                             "for int8")
        return self

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def for_precision(self, mode: str) -> "QuantizeConfig":
        """A copy with compute_dtype 'auto' resolved from a recipe's precision.mode."""
        if self.compute_dtype != "auto":
            return self
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(mode, "float32")
        return self.model_copy(update={"compute_dtype": dtype})

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, "float32" if self.compute_dtype == "auto" else self.compute_dtype)


@dataclass
class QuantizationReport:
    """What was quantised: per module name, how many, their parameters, bytes before and after."""

    kind: str
    double_quant: bool | None
    compute_dtype: str
    rows: dict[str, list[int]] = field(default_factory=dict)  # name -> [count, params, before, after]
    base_bytes: int = 0  # every base parameter and buffer of the model, after quantising
    source: str = "quantised at load"
    kept: list[str] = field(default_factory=list)  # the mixer modules left in the compute dtype
    # With the embeddings quantised: "tied" (the head reads their table), "untied" (the head
    # stays in the compute dtype) or "none" (no head); None when they are not quantised.
    head: str | None = None
    # A Transformer baseline (transformers' bitsandbytes rule: every Linear but the head); its
    # rows are the Linears' leaf names, which `model.quantize.modules` does not take.
    transformer: bool = False

    @classmethod
    def fresh(cls, config: "QuantizeConfig", **fields) -> "QuantizationReport":
        """The report of quantising with `config` now (not of a checkpoint saved quantised)."""
        return cls(config.kind, None if config.kind == "int8" else
                   (True if config.double_quant is None else config.double_quant),
                   config.compute_dtype if config.compute_dtype != "auto" else "float32", **fields)

    def add(self, name: str, params: int, bytes_before: int, bytes_after: int) -> None:
        """Count one quantised module under `name`."""
        row = self.rows.setdefault(name, [0, 0, 0, 0])
        for i, value in enumerate((1, params, bytes_before, bytes_after)):
            row[i] += value

    def record(self) -> dict:
        """What an adapter file keeps so `mamba-ft merge` can rebuild the same base (for a
        Transformer no `modules`: its quantisation has no choice of modules to rebuild)."""
        data = {"kind": self.kind, "compute_dtype": self.compute_dtype}
        if not self.transformer:
            data["modules"] = list(self.rows)
        if self.double_quant is not None:
            data["double_quant"] = self.double_quant
        return data

    def format(self) -> str:
        options = [f"compute dtype {self.compute_dtype}"]
        if self.double_quant is not None:
            options.insert(0, "double quantisation" if self.double_quant else "no double quantisation")
        lines = [f"base weights {self.kind} ({', '.join(options)}; {self.source}):",
                 f"{'module':<{self._width()}}{'modules':>9}{'parameters':>14}{'bytes before':>16}{'bytes after':>15}"]
        total_before = total_after = 0
        for name, (count, params, before, after) in self.rows.items():
            lines.append(f"{name:<{self._width()}}{count:>9}{params:>14,}{before:>16,}{after:>15,}")
            total_before += before
            total_after += after
        outside = {None: ["embeddings", "lm_head"], "untied": ["lm_head (untied)"]}.get(self.head, [])
        lines.append(f"kept in {self.compute_dtype}: {', '.join(self.kept + outside)}")
        if self.head == "tied":
            lines.append(f"lm_head: tied to the embeddings, reads their {self.kind} table "
                         f"(dequantised in its GEMM)")
        lines.append(f"base model: {self.base_bytes / 2**20:,.2f} MiB of weights "
                     f"({(self.base_bytes + total_before - total_after) / 2**20:,.2f} MiB unquantised)")
        return "\n".join(lines)

    def _width(self) -> int:
        # Transformer Linears have longer names (dense_h_to_4h) than Mamba's modules.
        return max([10] + [len(name) + 2 for name in self.rows])


def _kept(families: set[type], quantized: list[str]) -> list[str]:
    """The mixer modules of these families that stay unquantised, in a stable order."""
    kept: list[str] = []
    for family in sorted(families, key=lambda f: f.__name__):
        for name in [*_FAMILY_MODULES[family], *_FAMILY_KEPT[family]]:
            if name not in quantized and name not in kept:
                kept.append(name)
    return kept


def quantization_of(model: nn.Module) -> QuantizationReport | None:
    """The report of the quantisation applied to `model` by mamba-ft, if any."""
    return getattr(model, _ATTR, None)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, with each quantised weight's statistics (a tied
    weight, and a quantised table that a tied head reads, once)."""
    registered = list(model.parameters()) + list(model.buffers())
    total = sum(_nbytes(t) for t in registered)
    ids = {id(t) for t in registered}
    for module in model.modules():
        if is_quantized(module):
            total += sum(_nbytes(t) for t in _statistics(module) if id(t) not in ids)
    return total


def _statistics(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a quantised module needs beside its packed weight (row or block scales,
    code books), wherever bitsandbytes keeps them."""
    if isinstance(module, QuantizedEmbedding) and module.kind == "int8":
        return [module.SCB]  # a buffer
    if quantization_kind(module) == "int8":
        scb = getattr(module.weight, "SCB", None)
        return [module.state.SCB if scb is None else scb]
    state = getattr(module.weight, "quant_state", None) or module.quant_state
    return [v for v in state.as_dict(packed=True).values() if isinstance(v, torch.Tensor)]


def _quantized_bytes(module: nn.Module) -> int:
    """A quantised module's real storage: its packed weight and its statistics."""
    return _nbytes(module.weight) + sum(_nbytes(t) for t in _statistics(module))


def _require_bitsandbytes(kind: str, device: torch.device):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"model.quantize: {kind} needs bitsandbytes, which is not installed; install "
                        f"it with pip install 'mamba-ft[qlora]' (bitsandbytes {TESTED_BITSANDBYTES}), "
                        f"or set model.quantize: none.") from None
    # Quantise a tiny matrix first: a bitsandbytes build without a backend for this device
    # (no native library for it, an unsupported CPU) fails here with its own error, which is
    # turned into one message instead of a traceback halfway through the model.
    probe = torch.randn(8, 64, device=device)
    try:
        if kind == "int8":
            bnb.functional.int8_vectorwise_quant(probe.half())
        else:
            bnb.functional.quantize_4bit(probe, quant_type=kind)
    except Exception as exc:  # bitsandbytes raises RuntimeError, NotImplementedError, OSError...
        raise UserError(f"model.quantize: {kind} cannot run on {device.type} with bitsandbytes "
                        f"{bnb.__version__} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        f"use a device bitsandbytes supports, or set model.quantize: none.") from None
    return bnb


def _quantized_linear(bnb, linear: nn.Linear, config: QuantizeConfig) -> nn.Module:
    """A bitsandbytes Linear holding `linear`'s weight quantised (on the weight's device)."""
    device, dtype = linear.weight.device, config.torch_dtype()
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if config.kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                has_fp16_weights=False, threshold=0.0, device="meta")
        # Int8Params quantises when moved off the CPU or onto it from the CPU, so start there.
        q.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        double = True if config.double_quant is None else config.double_quant
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                              compute_dtype=dtype, compress_statistics=double,
                              quant_type=config.kind, device="meta")
        # Quantised from the compute dtype, so dequantising gives that dtype with no extra cast.
        q.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, compress_statistics=double,
                                     quant_type=config.kind, module=q).to(device)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q


# The modules each mixer family reads through `mamba_ft.modules.quantized`, and so may hold
# quantised weights; what it keeps in the compute dtype is reported.
# Zamba's x_proj / dt_proj are raw per-head parameters, not Linears: in_proj and out_proj only.
_FAMILY_MODULES = {MambaFTMixer: MIXER_MODULES, MambaFTMamba2Mixer: ("in_proj", "out_proj"),
                   MambaFTZambaMixer: ("in_proj", "out_proj")}
_FAMILY_KEPT = {MambaFTMixer: ("conv1d", "A_log", "D", "norms"),
                MambaFTMamba2Mixer: ("conv1d", "A_log", "D", "dt_bias", "norms"),
                MambaFTZambaMixer: ("conv1d", "x_proj", "dt_proj", "A_log", "D")}


def _quantizable_mixers(model: nn.Module, config: QuantizeConfig, where: str) -> list[nn.Module]:
    """The mixers, when every one reads quantised weights (modules/quantized.py) in each module
    the config names; any other mixer would read a quantised weight's packed bytes as a
    matrix, so it is refused."""
    all_mixers = mixers(model)
    if not all_mixers:
        raise UserError(f"model.quantize: {config.kind} is implemented for Mamba models, and {where} is "
                        f"not one, or its mixers were not swapped; load it with mamba_ft.models."
                        f"load_model, or set model.quantize: none.")
    others = sorted({type(m).__name__ for m in all_mixers if type(m) not in _FAMILY_MODULES})
    if others:
        raise UserError(f"model.quantize: {config.kind} is implemented for mamba-ft's Mamba-1 and "
                        f"Mamba-2 mixers, and {where} has {', '.join(others)}; set model.quantize: none.")
    for mixer in all_mixers:
        allowed = _FAMILY_MODULES[type(mixer)]
        missing = [name for name in config.modules if name not in allowed and name not in MODEL_MODULES]
        if missing:
            raise UserError(f"model.quantize.modules names {', '.join(missing)}, which "
                            f"{type(mixer).__name__} does not have; {where} can quantise "
                            f"{', '.join(allowed + MODEL_MODULES)}.")
    return all_mixers


def _targets(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(name, parent, attribute, module) for each mixer module a config names."""
    return [(name, mixer, name, getattr(mixer, name)) for mixer in mixers(model) for name in names
            if name in MIXER_MODULES]


def _quantizable_embedding(model: nn.Module, config: QuantizeConfig, where: str) -> nn.Embedding:
    """The input embedding, when `QuantizedEmbedding` computes exactly what it does."""
    emb = model.get_input_embeddings()
    if type(emb) is not nn.Embedding or emb.max_norm is not None:
        what = type(emb).__name__ if type(emb) is not nn.Embedding else "an nn.Embedding with max_norm"
        raise UserError(f"model.quantize.modules names embeddings, but {where}'s input embedding is "
                        f"{what}, which mamba-ft cannot quantise (it quantises a plain "
                        f"nn.Embedding); leave embeddings out of model.quantize.modules.")
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    if tied and getattr(head, "bias", None) is not None:
        raise UserError(f"model.quantize.modules names embeddings, and {where}'s output head is tied "
                        f"to them with a bias of its own, which mamba-ft's tied quantised head does "
                        f"not have; leave embeddings out of model.quantize.modules.")
    return emb


def _quantize_embeddings(model: nn.Module, emb: nn.Embedding, config: QuantizeConfig) -> str:
    """Replace the input embedding by a `QuantizedEmbedding` and a head tied to it by a
    `QuantizedTiedHead` reading the same table; returns "tied", "untied" or "none" (no head)."""
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    double = True if config.double_quant is None else config.double_quant
    q = QuantizedEmbedding.quantize(emb.weight, config.kind, config.torch_dtype(), double,
                                    padding_idx=emb.padding_idx)
    model.set_input_embeddings(q)
    if tied:
        model.set_output_embeddings(QuantizedTiedHead(q))
    return "tied" if tied else "untied" if head is not None else "none"


def quantize_model(model: nn.Module, config: QuantizeConfig, where: str = "this model") -> QuantizationReport | None:
    """Replace the modules `config` names by bitsandbytes ones holding their weights quantised.

    In place; returns the report (None for `kind: none`). The model must be a Mamba with
    mamba-ft's mixers (load_model swaps them in), or a Transformer baseline (a causal LM with
    no Mamba layers), whose Linears are quantised as transformers' bitsandbytes integration
    quantises them (`quantize_transformer`).
    """
    if not config.enabled:
        return None
    if quantization_of(model) is not None or any(is_quantized(m) for m in model.modules()):
        raise UserError(f"{where} is already quantised; quantise a full-precision model once.")
    if is_transformer_baseline(model):
        return quantize_transformer(model, config, where)
    families = {type(m) for m in _quantizable_mixers(model, config, where)}
    emb = _quantizable_embedding(model, config, where) if "embeddings" in config.modules else None
    bnb = _require_bitsandbytes(config.kind, next(model.parameters()).device)
    report = QuantizationReport.fresh(config, kept=_kept(families, config.modules))
    dtype = config.torch_dtype()
    for name, parent, attr, linear in _targets(model, config.modules):
        q = _quantized_linear(bnb, linear, config)
        setattr(parent, attr, q)
        report.add(name, linear.weight.numel(), linear.weight.numel() * dtype.itemsize,
                   _quantized_bytes(q))
    if emb is not None:
        report.head = _quantize_embeddings(model, emb, config)
        report.rows["embeddings"] = [1, emb.weight.numel(), emb.weight.numel() * dtype.itemsize,
                                     _quantized_bytes(model.get_input_embeddings())]
    report.base_bytes = base_weight_bytes(model)
    object.__setattr__(model, _ATTR, report)
    return report


# --- Transformer baselines ----------------------------------------------------------------
# A Transformer's forward calls its Linears as modules, so bitsandbytes' own Linear4bit /
# Linear8bitLt forwards run, and PEFT's LoRA wraps them (its bitsandbytes layers). Which Linears
# and how is transformers' rule (`from_pretrained(quantization_config=BitsAndBytesConfig(...))`):
# every nn.Linear (and GPT-2's Conv1D) but the output head, tied weights and the model's
# `_keep_in_fp32_modules`; the embeddings are not Linears and stay as they are.

_TRANSFORMER_MODULES_HELP = ("every Linear of its decoder layers, as transformers' bitsandbytes "
                             "integration does (the embeddings and lm_head stay in the compute dtype)")


def is_transformer_baseline(model: nn.Module) -> bool:
    """A model with no Mamba mixers whose type is not a Mamba one (a Mamba whose mixers were not
    swapped is not a baseline: quantising it is refused with the Mamba message)."""
    from mamba_ft.models.model_types import mamba_model_type

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return not mixers(model) and mamba_model_type(model_type) is None and hasattr(model, "get_output_embeddings")


def _check_transformer_modules(config: QuantizeConfig, where: str) -> None:
    """`model.quantize.modules` names Mamba modules (or the Mamba embeddings option); a Transformer
    has one choice, transformers' rule, taken when `modules` is left out."""
    if "modules" in config.model_fields_set:
        raise UserError(f"model.quantize.modules names {', '.join(config.modules)}, which are Mamba "
                        f"modules; {where} is a Transformer baseline, where model.quantize quantises "
                        f"{_TRANSFORMER_MODULES_HELP}. Remove model.quantize.modules.")


def _bnb_config(config: QuantizeConfig):
    """transformers' BitsAndBytesConfig for `config` (its defaults otherwise: for int8, the
    LLM.int8() outlier threshold 6.0)."""
    from transformers import BitsAndBytesConfig

    if config.kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    double = True if config.double_quant is None else config.double_quant
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.kind,
                              bnb_4bit_use_double_quant=double,
                              bnb_4bit_compute_dtype=config.torch_dtype())


def _transformer_skips(model: nn.Module) -> list[str]:
    """The module names transformers' bitsandbytes quantizer leaves unquantised by default
    (`llm_int8_skip_modules` unset): the output head, tied weights, the last parameter's module,
    plus the model's `_keep_in_fp32_modules`."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])


def _transformer_candidates(model: nn.Module, skips: list[str]) -> dict[str, nn.Module]:
    """name -> the Linear (or Conv1D) transformers' rule quantises."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    return {n: m for n, m in model.named_modules()
            if n and (type(m) is nn.Linear or isinstance(m, Conv1D)) and should_convert_module(n, skips)}


def _check_cpu_blocks(candidates: dict[str, nn.Module], config: QuantizeConfig, device: torch.device,
                      where: str) -> None:
    """bitsandbytes 0.50's CPU 4-bit matmul (what Linear4bit.forward runs there) dequantises a
    matrix row by row, which scrambles a matrix whose rows are not whole 64-weight blocks (the
    Mamba mixer's own GEMMs dequantise flat and are not affected). Refuse it where the model can
    only run on the CPU, before anything is quantised."""
    if config.kind == "int8" or device.type != "cpu" or torch.cuda.is_available():
        return
    bad = [(n, _in_features(m)) for n, m in candidates.items() if _in_features(m) % 64]
    if bad:
        name, width = bad[0]
        raise UserError(f"model.quantize: {config.kind} on the CPU: bitsandbytes' CPU 4-bit matmul gives "
                        f"wrong outputs for a Linear whose input width is not a multiple of 64, and "
                        f"{where} has {len(bad)} such ({name}: {width}); run it on a GPU, use "
                        f"model.quantize: int8, or a model whose widths are multiples of 64.")


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]  # Conv1D: (in, out)


def _materialize(bnb, q: nn.Module, original: nn.Module, config: QuantizeConfig) -> None:
    """Put `original`'s weight, quantised, into the meta-device bitsandbytes Linear `q` that
    transformers' `replace_with_bnb_linear` built (as its Bnb4bitQuantize / Bnb8bitQuantize
    conversions do while loading a checkpoint)."""
    from transformers.pytorch_utils import Conv1D

    weight = original.weight.detach()
    if isinstance(original, Conv1D):
        weight = weight.T  # Conv1D stores (in, out)
    device = weight.device
    if config.kind == "int8":
        kwargs = dict(q.weight.__dict__)
        kwargs.pop("SCB", None)
        # Int8Params quantises when moved off the CPU or onto it from the CPU, so start there.
        q.weight = bnb.nn.Int8Params(weight.contiguous().cpu(), requires_grad=False, **kwargs).to(device)
    else:
        # Quantised from the compute dtype, as mamba-ft's Mamba path does.
        q.weight = bnb.nn.Params4bit(weight.to(config.torch_dtype()).contiguous(), requires_grad=False,
                                     **q.weight.__dict__).to(device)
    if original.bias is not None:
        q.bias = nn.Parameter(original.bias.detach().clone(), requires_grad=False)


def quantize_transformer(model: nn.Module, config: QuantizeConfig, where: str = "this model") -> QuantizationReport:
    """Quantise a Transformer baseline's Linears with transformers' own bitsandbytes helper
    (`replace_with_bnb_linear`, `BitsAndBytesConfig`), on the already-built model: the modules
    it would quantise while loading are replaced, then filled with the quantised weights (the
    seam tests hold these transformers internals across the supported versions).
    The model is marked `is_loaded_in_4bit` / `is_loaded_in_8bit`, as transformers marks it, so
    PEFT wraps the quantised Linears in its bitsandbytes LoRA layers."""
    _check_transformer_modules(config, where)
    device = next(model.parameters()).device
    skips = _transformer_skips(model)
    candidates = _transformer_candidates(model, skips)
    if not candidates:
        raise UserError(f"model.quantize: {config.kind}: {where} has no Linear that transformers' "
                        f"bitsandbytes integration would quantise; set model.quantize: none.")
    _check_cpu_blocks(candidates, config, device, where)
    bnb = _require_bitsandbytes(config.kind, device)
    dtype = config.torch_dtype()
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    replace_with_bnb_linear(model, modules_to_not_convert=skips, quantization_config=_bnb_config(config))
    for name, original in candidates.items():
        q = model.get_submodule(name)
        if q is not original:  # one transformers built: fill it (a module it left stays as it is)
            _materialize(bnb, q, original, config)
    report = QuantizationReport.fresh(config, transformer=True)
    left = []
    for name, original in candidates.items():
        q = model.get_submodule(name)
        leaf = name.rsplit(".", 1)[-1]
        if not is_quantized(q):
            left.append(leaf)
            continue
        report.add(leaf, original.weight.numel(), original.weight.numel() * dtype.itemsize,
                   _quantized_bytes(q))
    # Linears left in the compute dtype besides the head (`_keep_in_fp32_modules`, tied ones);
    # the report adds the embeddings and the head.
    head = model.get_output_embeddings()
    others = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and not is_quantized(m) and m is not head} | set(left))
    report.kept = ["norms", *others]
    report.base_bytes = base_weight_bytes(model)
    _no_cpu_repacking(model)
    setattr(model, "is_loaded_in_8bit" if config.kind == "int8" else "is_loaded_in_4bit", True)
    object.__setattr__(model, _ATTR, report)
    return report


def _no_cpu_repacking(model: nn.Module) -> None:
    """Keep bitsandbytes 0.50's Linear4bit off its CPU inference kernel: on an AVX512-BF16 CPU
    the first eval-mode forward repacks the weight for it, and the repacked weight stays, so the
    next training forward takes that kernel's path too and fails (an in-place bias add on a
    tensor that needs a gradient), as an eval before training does in the training loop. Eval
    then computes what training does (the dequantised matrix times x)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _adopt_transformer(model: nn.Module, config: QuantizeConfig, where: str) -> QuantizationReport:
    """Report a Transformer baseline transformers loaded quantised (its own rule, as above)."""
    _check_transformer_modules(config, where)
    found: dict[str, list[nn.Module]] = {}
    for name, module in model.named_modules():
        if is_quantized(module):
            found.setdefault(name.rsplit(".", 1)[-1], []).append(module)
    kinds = {quantization_kind(m) for ms in found.values() for m in ms}
    if kinds != {config.kind}:
        raise UserError(f"{where} holds {', '.join(sorted(k or 'none' for k in kinds)) or 'no quantised'} "
                        f"weights, not {config.kind}; save it again, or quantise a full-precision checkpoint.")
    _no_cpu_repacking(model)
    return _saved_quantised_report(model, config, found, kept=["norms"], transformer=True)


def _prequantized_kind(qc: dict, where: str) -> tuple[str, bool | None]:
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise UserError(f"{where} was saved quantised with {method!r}; mamba-ft reads bitsandbytes "
                        f"checkpoints only. Use the full-precision checkpoint with model.quantize.")
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        return str(qc.get("bnb_4bit_quant_type", "fp4")), bool(qc.get("bnb_4bit_use_double_quant", False))
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "int8", None
    raise UserError(f"{where} has a bitsandbytes quantization_config that is neither 4-bit nor 8-bit; "
                    f"save it again, or use the full-precision checkpoint.")


def check_prequantized(qc: dict, config: QuantizeConfig | None, where: str) -> QuantizeConfig:
    """A checkpoint saved quantised must be what the recipe asks for: the same format and, where
    the recipe says, the same double quantisation. Returns the config to load it with."""
    kind, double = _prequantized_kind(qc, where)
    asked = config.kind if config is not None else "none"
    described = kind + ("" if double is None else (" with" if double else " without") + " double quantisation")
    if asked != kind:
        raise UserError(f"{where} is saved quantised ({described}) but model.quantize is {asked}; set "
                        f"model.quantize: {kind}, or load a full-precision checkpoint to quantise it "
                        f"as {asked}.")
    if "embeddings" in config.modules:  # checked before transformers loads the weights
        raise UserError(f"{where} is saved quantised by transformers, which keeps its embeddings in "
                        f"full precision, and mamba-ft quantises the embeddings of a full-precision "
                        f"checkpoint only; leave embeddings out of model.quantize.modules, or "
                        f"quantise a full-precision checkpoint.")
    if config.double_quant is not None and double is not None and config.double_quant != double:
        raise UserError(f"{where} is saved quantised ({described}) but model.quantize.double_quant is "
                        f"{str(config.double_quant).lower()}; set it to {str(double).lower()} (or leave "
                        f"it out), or quantise a full-precision checkpoint.")
    return config


def adopt_prequantized(model: nn.Module, config: QuantizeConfig, where: str) -> QuantizationReport:
    """Report a checkpoint transformers loaded quantised; its quantised modules must be the
    ones the recipe names (when it names them)."""
    if is_transformer_baseline(model):
        return _adopt_transformer(model, config, where)
    all_mixers = _quantizable_mixers(model, config, where)
    found: dict[str, list[nn.Module]] = {}
    for mixer in all_mixers:
        for name in _FAMILY_MODULES[type(mixer)]:
            if is_quantized(getattr(mixer, name)):
                found.setdefault(name, []).append(getattr(mixer, name))
    head = model.get_output_embeddings()
    if head is not None and is_quantized(head):
        raise UserError(f"{where} is saved with a quantised lm_head, which transformers' Mamba cannot "
                        f"run (it casts the hidden states to the head's packed dtype); save it with "
                        f"llm_int8_skip_modules: [lm_head], or quantise a full-precision checkpoint.")
    if "modules" in config.model_fields_set and sorted(found) != sorted(config.modules):
        raise UserError(f"{where} is saved with {', '.join(sorted(found)) or 'nothing'} quantised but "
                        f"model.quantize.modules is {', '.join(config.modules)}; set modules to "
                        f"[{', '.join(sorted(found))}] (or leave it out to take the checkpoint's).")
    kinds = {quantization_kind(m) for ms in found.values() for m in ms}
    if kinds != {config.kind}:
        raise UserError(f"{where} holds {', '.join(sorted(k or 'none' for k in kinds))} weights, not "
                        f"{config.kind}; save it again, or quantise a full-precision checkpoint.")
    return _saved_quantised_report(model, config, found,
                                   kept=_kept({type(m) for m in all_mixers}, list(found)))


def _saved_quantised_report(model: nn.Module, config: QuantizeConfig,
                            found: dict[str, list[nn.Module]], kept: list[str],
                            transformer: bool = False) -> QuantizationReport:
    """The report of a model loaded already quantised: `found` maps each quantised module name
    to its modules; its format, double quantisation and dtype are read from the first."""
    first = next(iter(found.values()))[0]
    double = None if config.kind == "int8" else bool(first.weight.quant_state.nested)
    dtype = str(dequantized_weight(first).dtype).removeprefix("torch.")
    report = QuantizationReport(config.kind, double, dtype, source="saved quantised", kept=kept,
                                transformer=transformer)
    for name, modules in found.items():
        report.rows[name] = [len(modules), sum(m.out_features * m.in_features for m in modules),
                             sum(m.out_features * m.in_features * dequantized_weight(m).element_size()
                                 for m in modules),
                             sum(_quantized_bytes(m) for m in modules)]
    report.base_bytes = base_weight_bytes(model)
    object.__setattr__(model, _ATTR, report)
    return report


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes Linear by an nn.Linear holding its dequantised matrix in
    `dtype` (fp32 holds every dequantised value exactly), a `QuantizedEmbedding` by an
    nn.Embedding holding its dequantised table, and a `QuantizedTiedHead` by an nn.Linear tied
    to that table; returns how many quantised modules (the tied head holds none). The model is a
    plain transformers model afterwards (its config loses any quantization_config). Adapters
    living on a replaced embedding or head are not moved (`merge_adapters` moves them)."""
    replaced = 0
    tables: dict[int, nn.Parameter] = {}  # id(QuantizedEmbedding) -> its dequantised table
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, QuantizedEmbedding):
                plain = nn.Embedding(child.num_embeddings, child.embedding_dim,
                                     padding_idx=child.padding_idx, device="meta")
                plain.weight = tables[id(child)] = nn.Parameter(child.dequantize(dtype), requires_grad=False)
                setattr(parent, attr, plain)
                replaced += 1
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, QuantizedTiedHead):
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                table = tables.get(id(child.embedding))
                plain.weight = table if table is not None else nn.Parameter(
                    child.embedding.dequantize(dtype), requires_grad=False)
                setattr(parent, attr, plain)
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if not is_quantized(child):
                continue
            weight = dequantized_weight(child).to(dtype)
            plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                              device="meta")
            plain.weight = nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                plain.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
            setattr(parent, attr, plain)
            replaced += 1
    if hasattr(model, _ATTR):
        object.__delattr__(model, _ATTR)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    # A checkpoint transformers loaded quantised carries its quantizer and flags, which
    # save_pretrained would write back as a quantization_config.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False) is True:
            setattr(model, flag, False)
    return replaced
