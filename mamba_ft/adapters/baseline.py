"""Transformer baselines (GPT-NeoX / Pythia, any causal LM): the same AdapterConfig, PEFT's LoRA.

Every module a Transformer's forward reads is called as a module, so PEFT's layers train there;
mamba-ft only maps its configuration onto a `LoraConfig` and injects it in place. Targets are
the model's module names (a leaf name such as `query_key_value` matches it in every layer),
plus `embeddings` / `lm_head` (the input embedding and output Linear, whatever their names) and
`all_linear` / `all` (every Linear except the output head).
"""

from __future__ import annotations

import re

from torch import nn

from mamba_ft.adapters.report import ReportRow
from mamba_ft.adapters.config import ALIAS_NAMES, ALL_MAMBA_TARGETS, AdapterConfig
from mamba_ft.errors import UserError, did_you_mean

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, nn.Embedding, Conv1D))


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def resolve_module_targets(model: nn.Module, config: AdapterConfig) -> dict[str, str]:
    """Full module name -> the configured target it comes from."""
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    adaptable = {n: m for n, m in model.named_modules() if n and _adaptable(m)}
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    out: dict[str, str] = {}
    for target in config.targets:
        if target in ("embeddings", "lm_head"):
            module = model.get_input_embeddings() if target == "embeddings" else head
            if module is None or id(module) not in names:
                raise UserError(f"adapter target {target!r} matches nothing in this {_model_type(model)} model.")
            matched = [names[id(module)]]
        elif target in ALIAS_NAMES:
            matched = [n for n, m in adaptable.items()
                       if not isinstance(m, nn.Embedding) and m is not head]
        elif target in ALL_MAMBA_TARGETS and not any(n.rsplit(".", 1)[-1] == target for n in adaptable):
            raise UserError(f"adapter target {target!r} exists only in Mamba models; this is a "
                            f"{_model_type(model)} model, whose adaptable modules are: "
                            f"{', '.join(leaf_names)} (plus embeddings, lm_head, all_linear).")
        else:
            matched = [n for n in adaptable if n == target or n.endswith("." + target)]
            if not matched:
                raise UserError(f"adapter target {target!r} matches no module of this "
                                f"{_model_type(model)} model.{did_you_mean(target, leaf_names)} Its "
                                f"adaptable modules are: {', '.join(leaf_names)} (plus embeddings, "
                                f"lm_head, all_linear).")
        for name in matched:
            out.setdefault(name, target)
    if config.layers is not None:
        indices = {int(m.group(1)) for n in out if (m := _LAYER_INDEX.search(n))}
        missing = [i for i in config.layers if i not in indices]
        if missing:
            raise UserError(f"adapter layers name layer {missing[0]}, which no targeted module has "
                            f"(layers found: {sorted(indices)}); fix adapter.layers.")
        # Modules outside the numbered layers (embeddings, head) are not restricted by `layers`.
        out = {n: t for n, t in out.items()
               if (m := _LAYER_INDEX.search(n)) is None or int(m.group(1)) in config.layers}
    return out


def attach_peft(model: nn.Module, config: AdapterConfig):
    module_targets = resolve_module_targets(model, config)
    rows, peft_config = inject_lora(model, config, module_targets)
    return rows, peft_config, module_targets


def inject_lora(model: nn.Module, config: AdapterConfig, module_targets: dict[str, str]):
    """PEFT LoRA in exactly the modules named (full name -> target); (report rows, LoraConfig).
    A Transformer baseline's every target goes here, a hybrid's attention / MLP ones too."""
    from peft import LoraConfig, inject_adapter_in_model

    rank_pattern = {name: config.rank_for(t) for name, t in module_targets.items()
                    if config.rank_for(t) != config.rank}
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=sorted(module_targets), rank_pattern=rank_pattern,
                             task_type="CAUSAL_LM")
    inject_adapter_in_model(peft_config, model)
    counts: dict[str, list[int]] = {}
    modules = dict(model.named_modules())
    for name, target in module_targets.items():
        row = counts.setdefault(target, [0, 0])
        row[0] += 1
        row[1] += sum(p.numel() for n, p in modules[name].named_parameters() if "lora_" in n)
    return [ReportRow(t, c[0], c[1]) for t, c in counts.items()], peft_config


def unload_peft(model: nn.Module, merge: bool) -> None:
    """Replace every PEFT LoRA layer by its base layer, folding the adapter in when `merge`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge and type(module).__module__.endswith(".bnb"):
                # PEFT's bitsandbytes LoRA layer whose base `dequantize_model` has made a plain
                # Linear (QLoRA merge): its own merge would re-quantise; add the delta instead.
                base = module.get_base_layer()
                if type(base) is not nn.Linear:
                    raise UserError("Merging LoRA into a quantised Transformer Linear needs it "
                                    "dequantised first; use mamba_ft.adapters.merge_adapters.")
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        base.weight.data += module.get_delta_weight(adapter).to(base.weight.dtype)
            elif merge:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
