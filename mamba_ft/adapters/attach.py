"""Attach adapters to a model (Mamba: mamba-ft's layers; any other causal LM: PEFT LoRA).

`attach_adapters(model, config)` freezes the base model, adds the adapters, leaves only their
parameters trainable and returns an `AdapterReport`. What was attached is recorded on the model
(`attached(model)`), which saving, loading, merging and `detach_adapters` read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mamba_ft.adapters import hybrid
from mamba_ft.adapters.config import AdapterConfig, TargetFamily
from mamba_ft.adapters.families import MixerFamily, family_of_model
from mamba_ft.adapters.lora import (
    EmbeddingAdapter,
    HeadAdapter,
    add_module_adapter,
    remove_module_adapter,
)
from mamba_ft.adapters.report import AdapterReport, ReportRow
from mamba_ft.errors import UserError
from mamba_ft.models import mixers
from mamba_ft.models.model_types import mamba_model_type
from mamba_ft.modules.quantized import QuantizedTiedHead, logical_numel

_ATTR = "mamba_ft_adapters"


@dataclass
class Attached:
    """What `attach_adapters` did to a model, so it can be saved, merged or undone."""

    config: AdapterConfig
    is_mamba: bool
    requires_grad_before: dict[str, bool]
    peft_config: object | None = None  # the LoraConfig, for a Transformer baseline
    module_targets: dict[str, str] = field(default_factory=dict)  # adapted module path -> target
    family: TargetFamily | None = None  # the Mamba family's target vocabulary; None for a baseline
    # A hybrid's attention / MLP Linears holding PEFT LoRA (module path -> target), under
    # `peft_config`; empty for a pure Mamba.
    hybrid_modules: dict[str, str] = field(default_factory=dict)


def attached(model: nn.Module) -> Attached | None:
    return getattr(model, _ATTR, None)


def is_adapter_parameter(name: str) -> bool:
    """mamba-ft's adapters live under `.adapter.`; PEFT's parameters start with `lora_`."""
    parts = name.split(".")
    return "adapter" in parts or any(p.startswith("lora_") for p in parts)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if is_adapter_parameter(n)}


def _count_base(model: nn.Module) -> int:
    # A 4-bit weight packs two values a byte: count the matrix it stands for, so the shares in
    # the report are the same as on an unquantised base.
    total, seen = 0, set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen and not is_adapter_parameter(f"{module_name}.{name}"):
                seen.add(id(p))  # a tied weight once, as named_parameters() counts it
                total += logical_numel(module, name, p)
    return total


def attach_adapters(model: nn.Module, config: AdapterConfig) -> AdapterReport:
    """Freeze `model`, add the adapters `config` describes, return what was added."""
    if attached(model) is not None:
        raise UserError("This model already has adapters attached; attach them once (or merge / "
                        "detach the present ones first).")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = _count_base(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if mamba_model_type(model_type) is not None and not mixers(model):
        raise UserError("This model still has transformers' own Mamba mixers, which read raw weights "
                        "and would bypass adapters; load it with mamba_ft.models.load_model (or call "
                        "mamba_ft.models.swap_mixers) before attaching adapters.")
    if mixers(model):
        family = family_of_model(mixers(model))
        entry = mamba_model_type(model_type)
        mamba_config, hybrid_modules, linears, peft_config = config, {}, {}, None
        if entry is not None and entry.hybrid:
            linears = hybrid.layer_linears(model, mixers(model))
            mamba_targets, hybrid_modules = hybrid.split_targets(config, family.targets, linears)
            mamba_config = _restricted(config, mamba_targets, family.targets)
        rows, module_targets = _attach_mamba(model, mamba_config, family)
        if hybrid_modules:
            from mamba_ft.adapters.baseline import inject_lora

            lora_rows, peft_config = inject_lora(model, config, hybrid_modules)
            rows += lora_rows
            module_targets.update(hybrid_modules)
        record = Attached(config, True, flags, peft_config=peft_config, module_targets=module_targets,
                          family=family.targets, hybrid_modules=hybrid_modules)
        notes = []
        if config.dropout > 0:
            notes.append(f"dropout {config.dropout} acts on the side paths (in_proj, out_proj, lm_head"
                         f"{', attention / MLP LoRA' if hybrid_modules else ''}) only.")
        if entry is not None and entry.hybrid:
            adapted_mixers = sum(m.adapter is not None for m in mixers(model))
            notes.append(hybrid.coverage(linears, hybrid_modules, len(mixers(model)), adapted_mixers))
    else:
        from mamba_ft.adapters.baseline import attach_peft

        rows, peft_config, module_targets = attach_peft(model, config)
        record = Attached(config, False, flags, peft_config=peft_config, module_targets=module_targets)
        notes = ["Transformer baseline: PEFT LoRA on " + ", ".join(sorted(set(module_targets.values()))) + "."]
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
    # A plain attribute (not a module or tensor): nn.Module keeps it out of the state dict.
    object.__setattr__(model, _ATTR, record)
    return AdapterReport(rows, base, notes)


def _attach_mamba(model: nn.Module, config: AdapterConfig, family: MixerFamily):
    targets = config.check_for(family.targets)
    all_mixers = mixers(model)
    n_layers = len(all_mixers)
    if config.layers is not None and max(config.layers) >= n_layers:
        raise UserError(f"adapter layers {config.layers} name layer {max(config.layers)}, but the model "
                        f"has {n_layers} layers (0..{n_layers - 1}); fix adapter.layers.")
    chosen = [m for m in all_mixers if config.layers is None or m.layer_idx in config.layers]
    mixer_targets = [t for t in targets if t in family.targets.mixer_targets]
    module_paths = {id(m): n for n, m in model.named_modules()}
    module_targets: dict[str, str] = {}
    counts = {t: [0, 0] for t in targets}
    if mixer_targets:
        for mixer in chosen:
            adapter = family.adapter_class(mixer, mixer_targets, config.rank_for, config.scale_for,
                                           config.dropout)
            mixer.adapter = adapter.to(mixer.A_log.device)
            for t in mixer_targets:
                if not adapter.holds(t):
                    continue
                counts[t][0] += 1
                counts[t][1] += adapter.target_numel(t)
                module_targets[f"{module_paths[id(mixer)]}.{t}"] = t
        # A buffer these mixers lack (Falcon-H1 without its gated norm): an error when named,
        # left out of the report when an alias (`all`) brought it.
        for t in mixer_targets:
            if counts[t][0] == 0:
                if t in config.targets:
                    for mixer in chosen:
                        mixer.adapter = None
                    raise UserError(f"adapter target {t!r} matches nothing: this model's "
                                    f"{family.targets.name} mixers have no {t}; leave it out.")
                del counts[t]

    if "embeddings" in targets:
        emb = model.get_input_embeddings()
        adapter = EmbeddingAdapter(emb.num_embeddings, emb.embedding_dim, config.rank_for("embeddings"),
                                   config.scale_for("embeddings")).to(emb.weight.device)
        add_module_adapter(emb, adapter)
        counts["embeddings"] = [1, sum(p.numel() for p in adapter.parameters())]
        module_targets[module_paths[id(emb)]] = "embeddings"
    if "lm_head" in targets:
        head = model.get_output_embeddings()
        # A head tied to quantised embeddings (QuantizedTiedHead) takes the side path on top of
        # its logits, as a plain Linear does.
        if not isinstance(head, (nn.Linear, QuantizedTiedHead)):
            raise UserError("adapter target 'lm_head' matches nothing: this model has no output Linear "
                            "(load it as a causal LM, e.g. MambaForCausalLM).")
        adapter = HeadAdapter(head.out_features, head.in_features, config.rank_for("lm_head"),
                              config.scale_for("lm_head"), config.dropout).to(head.weight.device)
        add_module_adapter(head, adapter)
        counts["lm_head"] = [1, sum(p.numel() for p in adapter.parameters())]
        module_targets[module_paths[id(head)]] = "lm_head"
    return [ReportRow(t, c[0], c[1]) for t, c in counts.items()], module_targets


def _restricted(config: AdapterConfig, targets: list[str], family: TargetFamily) -> AdapterConfig:
    """`config` with only the targets a hybrid's Mamba layers take (and their ranks)."""
    expanded = family.expand(targets)
    ranks = {t: r for t, r in config.rank_per_target.items() if t in expanded}
    return config.model_copy(update={"targets": targets, "rank_per_target": ranks})


def detach_adapters(model: nn.Module) -> None:
    """Remove the adapters without merging them; restore which parameters were trainable."""
    record = attached(model)
    if record is None:
        return
    if record.is_mamba:
        if record.hybrid_modules:
            from mamba_ft.adapters.baseline import unload_peft

            unload_peft(model, merge=False)
        for mixer in mixers(model):
            mixer.adapter = None
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and isinstance(getattr(module, "adapter", None), (EmbeddingAdapter, HeadAdapter)):
                remove_module_adapter(module)
    else:
        from mamba_ft.adapters.baseline import unload_peft

        unload_peft(model, merge=False)
    object.__delattr__(model, _ATTR)
    for name, param in model.named_parameters():
        param.requires_grad_(record.requires_grad_before.get(name, True))
