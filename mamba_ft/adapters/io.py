"""Saving and loading adapters in PEFT's on-disk format, plus what only mamba-ft can apply.

An adapter directory holds
- `adapter_config.json` + `adapter_model.safetensors`: PEFT's LoRA format, with the targets
  plain PEFT applies correctly on transformers' model (the family's `TargetFamily.peft`:
  Mamba-1 in_proj, x_proj, embeddings, lm_head; Zamba in_proj, out_proj, embeddings, lm_head;
  Mamba-2 in_proj, embeddings, lm_head; for a Transformer baseline all of them), so
  `peft.PeftModel.from_pretrained` loads them;
- `mamba_ft_adapter.json`: the AdapterConfig, the base model source, the model type and the
  targets in each file;
- `mamba_ft_adapter.safetensors` (when there are any): the targets PEFT cannot apply on a Mamba
  (Mamba-1: conv1d, dt_proj, out_proj, x_proj's row blocks, A_log, D, dt_bias; Mamba-2: in_proj's
  row blocks, conv1d, out_proj, norm, A_log, D, dt_bias), keyed by parameter name.
A separate file keeps PEFT's config free of unknown keys (PEFT would drop them with a warning).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from mamba_ft.adapters.attach import adapter_parameters, attach_adapters, attached, detach_adapters
from mamba_ft.adapters.config import MAMBA1, AdapterConfig, TargetFamily
from mamba_ft.errors import UserError
from mamba_ft.models.quantize import quantization_of

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
META = "mamba_ft_adapter.json"
EXTRA_WEIGHTS = "mamba_ft_adapter.safetensors"
FORMAT_VERSION = 1
_PEFT_PREFIX = "base_model.model."
# Mamba-1 targets whose module transformers' forward calls (so a PEFT LoRA there is applied);
# each family's are in its TargetFamily.peft.
PEFT_MAMBA_TARGETS = MAMBA1.peft


def peft_key(name: str, family: TargetFamily | None) -> str | None:
    """PEFT's key for an adapter parameter, or None when it goes to mamba-ft's own file.

    `family`: the Mamba family's target vocabulary, None for a Transformer baseline (PEFT's
    own layers)."""
    parts = name.split(".")
    if family is None or "adapter" not in parts:  # PEFT's own layer (a baseline's, a hybrid's
        # attention / MLP): drop the adapter name ("default")
        if parts[-1] == "default":  # lora_embedding_A.default
            parts = parts[:-1]
        elif parts[-2] == "default":  # lora_A.default.weight
            parts = parts[:-2] + parts[-1:]
        return _PEFT_PREFIX + ".".join(parts)
    i = parts.index("adapter")
    owner, rest = parts[:i], parts[i + 1:]
    if rest[0] == "low_rank" and rest[1] in family.peft:  # mixer.adapter.low_rank.in_proj.lora_A
        return _PEFT_PREFIX + ".".join(owner + [rest[1], rest[2], "weight"])
    if rest == ["lora_embedding_A"] or rest == ["lora_embedding_B"]:  # embeddings.adapter.lora_embedding_A
        return _PEFT_PREFIX + ".".join(owner + rest)
    if rest in (["lora_A"], ["lora_B"]):  # lm_head.adapter.lora_A
        return _PEFT_PREFIX + ".".join(owner + [rest[0], "weight"])
    return None


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def _recorded_source(base_model: str) -> str:
    # Record local paths absolutely so `mamba-ft merge` works from any directory. A source that
    # cannot be a path (a config mapping written out, longer than a file name may be) is kept
    # as given.
    if base_model.startswith("bundled:"):
        return base_model
    try:
        path = Path(base_model).expanduser()
        return str(path.resolve()) if path.exists() else base_model
    except OSError:
        return base_model


def _peft_config_dict(model: nn.Module, base_model: str) -> dict:
    from peft import LoraConfig

    record = attached(model)
    if record.is_mamba:
        config = record.config
        # For these targets the recorded path ("<mixer>.in_proj", "lm_head") is the module PEFT wraps.
        modules = {m: t for m, t in record.module_targets.items()
                   if t in record.family.peft or m in record.hybrid_modules}
        rank_pattern = {m: config.rank_for(t) for m, t in modules.items() if config.rank_for(t) != config.rank}
        peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=sorted(modules), rank_pattern=rank_pattern,
                                 task_type="CAUSAL_LM")
    else:
        peft_config = record.peft_config
    data = peft_config.to_dict()
    data["base_model_name_or_path"] = base_model
    data["inference_mode"] = True
    for key, value in data.items():  # sets and enums are not JSON
        if isinstance(value, set):
            data[key] = sorted(value)
    return json.loads(json.dumps(data, default=str))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapters(model: nn.Module, out_dir: str | Path, base_model: str) -> Path:
    """Write the attached adapters to `out_dir` (created if needed); returns the directory."""
    record = attached(model)
    if record is None:
        raise UserError("There are no adapters attached to this model to save; attach_adapters first "
                        "(or save the full model with save_pretrained).")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"Adapter output {out} exists and is not a directory; choose another path.")
    out.mkdir(parents=True, exist_ok=True)
    source = _recorded_source(str(base_model))
    peft_tensors, extra_tensors = {}, {}
    for name, param in adapter_parameters(model).items():
        tensor = param.detach().to("cpu", torch.float32).contiguous()
        key = peft_key(name, record.family)
        if key is None:
            extra_tensors[name] = tensor
        else:
            peft_tensors[key] = tensor
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": source,
        "model_type": _model_type(model),
        "config": record.config.model_dump(mode="json"),
        "peft_targets": sorted({t for m, t in record.module_targets.items()
                                if not record.is_mamba or t in record.family.peft
                                or m in record.hybrid_modules}),
        "mamba_ft_only_targets": sorted({t for m, t in record.module_targets.items()
                                         if record.is_mamba and t not in record.family.peft
                                         and m not in record.hybrid_modules}),
    }
    # A QLoRA adapter was trained against the dequantised base: merging rebuilds that base
    # (the same quantisation of the same checkpoint is the same bytes) instead of the original.
    if (quantization := quantization_of(model)) is not None:
        meta["base_quantization"] = quantization.record()
    _atomic_write(out / PEFT_WEIGHTS, lambda p: save_file(peft_tensors, p, metadata={"format": "pt"}))
    if extra_tensors:
        _atomic_write(out / EXTRA_WEIGHTS, lambda p: save_file(extra_tensors, p, metadata={"format": "pt"}))
    elif (out / EXTRA_WEIGHTS).exists():  # left from an earlier save of this adapter
        (out / EXTRA_WEIGHTS).unlink()
    peft_json = json.dumps(_peft_config_dict(model, source), indent=2, sort_keys=True)
    _atomic_write(out / PEFT_CONFIG, lambda p: Path(p).write_text(peft_json))
    _atomic_write(out / META, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return out


def _read_meta(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise UserError(f"Adapter directory {adapter_dir} does not exist; pass the directory "
                        f"save_adapters (or a training run) wrote.")
    path = adapter_dir / META
    if not path.exists():
        hint = (" It holds a plain PEFT adapter: load it with peft.PeftModel.from_pretrained."
                if (adapter_dir / PEFT_CONFIG).exists() else "")
        raise UserError(f"{adapter_dir} has no {META}, so it was not written by mamba-ft.{hint}")
    try:
        meta = json.loads(path.read_text())
        meta["base_model"], meta["config"], meta["model_type"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}); save the adapter again.") from None
    return meta


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model source recorded when the adapter was saved."""
    return str(_read_meta(Path(adapter_dir))["base_model"])


def read_adapter_config(adapter_dir: str | Path) -> AdapterConfig:
    path = Path(adapter_dir)
    try:
        return AdapterConfig.model_validate(_read_meta(path)["config"])
    except ValidationError as exc:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise UserError(f"The adapter configuration in {path / META} is invalid: {reasons}.") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise UserError(f"Could not read the adapter weights {file}: {exc}. The file is damaged or "
                        f"truncated; save or copy the adapter again.") from None


def read_adapter_dir(adapter_dir: str | Path) -> tuple[dict, AdapterConfig, dict[str, torch.Tensor]]:
    """Metadata, configuration and tensors of an adapter directory, each checked (UserError)."""
    adapter_dir = Path(adapter_dir)
    meta = _read_meta(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = _read_tensors(adapter_dir / PEFT_WEIGHTS)
    if (adapter_dir / EXTRA_WEIGHTS).exists():
        tensors.update(_read_tensors(adapter_dir / EXTRA_WEIGHTS))
    return meta, config, tensors


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Attach (if needed) and fill the adapters saved in `adapter_dir`; returns the model.

    Everything is read and checked against the model before any tensor is copied: on any
    mismatch the model is left as it was (adapters attached here are removed again).
    """
    adapter_dir = Path(adapter_dir)
    meta, config, tensors = read_adapter_dir(adapter_dir)
    base = meta["base_model"]
    if meta["model_type"] != _model_type(model):
        raise UserError(f"The adapter in {adapter_dir} was made for a {meta['model_type']!r} model "
                        f"({base}), not this {_model_type(model)!r} model; load it onto its base model.")

    record = attached(model)
    if record is not None and record.config != config:
        raise UserError(f"This model already has adapters with another configuration than {adapter_dir}; "
                        f"load the adapter onto a model without adapters.")
    attached_here = record is None
    if attached_here:
        attach_adapters(model, config)
    try:
        family = attached(model).family
        params = {(peft_key(n, family) or n): p for n, p in adapter_parameters(model).items()}
        problem = _mismatch(params, tensors)
        if problem:
            raise UserError(f"The adapter in {adapter_dir} does not fit this model ({problem}); it was "
                            f"made for a model of another shape ({base}). Load it onto that base model.")
    except BaseException:
        if attached_here:
            detach_adapters(model)
        raise
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(param.dtype))
    return model


def _mismatch(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> str | None:
    for key, param in params.items():
        if key not in tensors:
            return f"no tensor {key}"
        if tuple(tensors[key].shape) != tuple(param.shape):
            return f"{key} is {tuple(tensors[key].shape)} in the file, {tuple(param.shape)} here"
    extra = sorted(set(tensors) - set(params))
    return f"unexpected tensor {extra[0]}" if extra else None


def is_adapter_dir(source) -> bool:
    """Whether `source` names a directory `save_adapters` wrote (and not a model directory)."""
    return (isinstance(source, (str, Path)) and (Path(source) / META).is_file()
            and not (Path(source) / "config.json").is_file())
