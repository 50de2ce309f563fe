"""Fold adapters into the base weights: a plain transformers model and checkpoint.

Every adapter is a delta on a base tensor (W + s·B·A, an additive SSM delta, an embedding
delta), so merging adds it in fp32 and removes the adapter. A tied input/output embedding
whose one side is adapted is untied first (the two matrices differ afterwards), and the
config says so, so the saved checkpoint loads back with both (and, as transformers unties
Zamba's shared block under the same flag, each use of that block holds a copy).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from mamba_ft.adapters.attach import attached, detach_adapters
from mamba_ft.adapters.io import load_adapters, read_adapter_dir
from mamba_ft.adapters.lora import (EmbeddingAdapter, HeadAdapter, add_module_adapter,
                                    remove_module_adapter)
from mamba_ft.errors import UserError
from mamba_ft.models import mixers
from mamba_ft.models.swap import unshare_tied_blocks
from mamba_ft.models.quantize import QuantizeConfig, dequantize_model


def _base_layer(module: nn.Module) -> nn.Module:
    """The module holding the weight (PEFT wraps adapted layers)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _untie_adapted_embeddings(model: nn.Module, record) -> None:
    emb_module, head_module = model.get_input_embeddings(), model.get_output_embeddings()
    if emb_module is None or head_module is None:
        return
    emb, head = _base_layer(emb_module), _base_layer(head_module)
    if emb.weight is not head.weight:
        return
    names = {id(m): n for n, m in model.named_modules()}
    adapted = set(record.module_targets) | set(record.module_targets.values())
    if not adapted & {"embeddings", "lm_head", names.get(id(emb_module)), names.get(id(head_module))}:
        return
    head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None:
        text_config.tie_word_embeddings = False
    # transformers ties Zamba's shared block under the same flag: each use keeps a copy (the
    # adapters in it are copied too, and each copy merges its own).
    unshare_tied_blocks(model)


def dequantize_keeping_adapters(model: nn.Module) -> int:
    """`dequantize_model` (returns its count), with the embedding / head adapters moved onto the
    plain modules that replace a quantised embedding and its tied head (they are children of
    the module they adapt, applied by its forward hook)."""
    lifted = []
    for get in (model.get_input_embeddings, model.get_output_embeddings):
        module = get()
        adapter = getattr(module, "adapter", None) if module is not None else None
        if isinstance(adapter, (EmbeddingAdapter, HeadAdapter)):
            remove_module_adapter(module)
            lifted.append((get, adapter))
    replaced = dequantize_model(model)
    for get, adapter in lifted:
        add_module_adapter(get(), adapter)
    return replaced


def merge_adapters(model: nn.Module) -> nn.Module:
    """Add every adapter to its base tensor and remove the adapters; returns the model."""
    record = attached(model)
    if record is None:
        raise UserError("There are no adapters attached to this model to merge; load or attach them first.")
    # A quantised base (QLoRA) becomes plain fp32 Linears (and embedding) holding the dequantised
    # matrices, the weights the adapters were trained against; the deltas are then added to those.
    dequantize_keeping_adapters(model)
    _untie_adapted_embeddings(model, record)
    with torch.no_grad():
        if record.is_mamba:
            if record.hybrid_modules:  # a hybrid's attention / MLP LoRA (PEFT's layers)
                from mamba_ft.adapters.baseline import unload_peft

                unload_peft(model, merge=True)
            for mixer in mixers(model):
                if mixer.adapter is not None:
                    mixer.adapter.merge_into(mixer)
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                adapter = getattr(module, "adapter", None) if module is not None else None
                if adapter is not None:
                    module.weight.copy_((module.weight.float() + adapter.delta()).to(module.weight.dtype))
        else:
            from mamba_ft.adapters.baseline import unload_peft

            unload_peft(model, merge=True)
    detach_adapters(model)
    return model


def _check_out(out: Path, adapter_dir: Path, base: str, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a directory for the merged model.")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} already exists and is not empty; choose a new directory or "
                            f"pass --overwrite to replace it.")
        protected = [adapter_dir.resolve()]
        if Path(base).expanduser().exists():
            protected.append(Path(base).expanduser().resolve())
        target = out.resolve()
        for path in protected:
            if target == path or target in path.parents:
                raise UserError(f"--out {out} holds the adapter or base model being merged; write the "
                                f"merged model to another directory.")


def _recorded_quantization(record, adapter_dir: Path) -> QuantizeConfig:
    """The quantisation the adapter was trained on, as its mamba_ft_adapter.json records it."""
    try:
        return QuantizeConfig.model_validate(record)
    except ValidationError as exc:
        first = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"{adapter_dir}/mamba_ft_adapter.json records a base_quantization mamba-ft "
                        f"cannot rebuild ({first}); save the adapter again.") from None


def merge_adapter_dir(adapter_dir, out, base: str | None = None, overwrite: bool = False) -> Path:
    """`mamba-ft merge`: base model + adapter -> a plain transformers checkpoint in `out`.

    The checkpoint (config, safetensors, tokenizer) is written to a temporary directory beside
    `out` and renamed into place, so a failure leaves `out` as it was.
    """
    from mamba_ft.models import load_model

    adapter_dir, out = Path(adapter_dir), Path(out)
    meta, _, _ = read_adapter_dir(adapter_dir)  # a damaged adapter fails before the base loads
    source = base or meta["base_model"]
    _check_out(out, adapter_dir, source, overwrite)
    quantization = meta.get("base_quantization")
    loaded = load_model(source, need_tokenizer=True, allow_transformers=True,
                        quantize=None if quantization is None else _recorded_quantization(quantization, adapter_dir))
    load_adapters(loaded.model, adapter_dir)
    model = merge_adapters(loaded.model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            out.rename(old)  # onto the empty directory just made
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
