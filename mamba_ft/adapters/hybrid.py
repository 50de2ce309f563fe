"""The layers of a hybrid that are not Mamba (attention, MLP / MoE): which Linears they hold, and
which of them a configuration names (PEFT LoRA goes into those: `baseline.inject_lora`).

A hybrid's Mamba mixers take mamba-ft's adapters (their family's targets, `families.py`); its
attention and MLP Linears are called as modules by transformers' forward, so PEFT's LoRA layers
train there exactly as on a Transformer baseline. Targets that reach them:
- `attention`: every Linear inside an attention module (class name ending in `Attention`);
- `mlp`: every Linear inside an MLP or MoE module (`...MLP`, `...MoE`), except a router's
  (`...Gating`, `...Router`: LoRA on the routing logits would move tokens between experts).
  Experts stored as stacked parameters instead of Linears (Nemotron-H's, Granite's) hold none;
- a Linear's own name (`q_proj`, `down_proj`, ...), as for a Transformer baseline;
- `all`: the mixer family's `all` plus `attention` and `mlp`.
"""

from __future__ import annotations

from torch import nn

from mamba_ft.adapters.config import HYBRID_KINDS, AdapterConfig, TargetFamily
from mamba_ft.errors import UserError, did_you_mean

_KIND_SUFFIXES = {"attention": ("Attention",), "mlp": ("MLP", "MoE")}
_ROUTER_SUFFIXES = ("Gating", "Router")


def _kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    return next((kind for kind, suffixes in _KIND_SUFFIXES.items() if name.endswith(suffixes)),
                None)


def layer_linears(model: nn.Module, mixers: list[nn.Module]) -> dict[str, str]:
    """Full module name -> layer kind ('attention' or 'mlp') of every Linear of the non-Mamba
    layers; the mixers' own Linears, routers and the output head are left out."""
    inside_mixers = {id(m) for mixer in mixers for m in mixer.modules()}
    head = model.get_output_embeddings()
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None or id(module) in inside_mixers:
            continue
        routers = {id(m) for r in module.modules() if type(r).__name__.endswith(_ROUTER_SUFFIXES)
                   for m in r.modules()}
        wrapped = {id(m) for w in module.modules() if hasattr(w, "get_base_layer")
                   for m in w.modules() if m is not w}
        for child_name, child in module.named_modules():
            # A Linear PEFT already wraps counts as its wrapper (its inner Linears do not).
            linear = isinstance(child, nn.Linear) or isinstance(
                getattr(child, "get_base_layer", lambda: None)(), nn.Linear)
            if (linear and child is not head and id(child) not in routers
                    and id(child) not in wrapped):
                out.setdefault(f"{name}.{child_name}", kind)  # an inner module of an outer kind
    return out


def split_targets(config: AdapterConfig, family: TargetFamily,
                  linears: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(the targets the mixer family takes, {module name: target} for PEFT LoRA)."""
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
    mamba_names = set(family.targets) | set(family.aliases)
    mamba: list[str] = []
    modules: dict[str, str] = {}
    for target in config.targets:
        if target == "all":
            mamba.append(target)
            chosen = list(linears)
        elif target in HYBRID_KINDS:
            chosen = [n for n, kind in linears.items() if kind == target]
        elif target in mamba_names:
            mamba.append(target)
            continue
        elif target in leaf_names:
            chosen = [n for n in linears if n.rsplit(".", 1)[-1] == target]
        else:
            vocabulary = [*family.targets, *family.aliases, *HYBRID_KINDS, *leaf_names]
            raise UserError(f"Unknown adapter target {target!r} for this hybrid model."
                            f"{did_you_mean(target, vocabulary)} Its Mamba layers take "
                            f"{family.valid_text()}; its other layers take {', '.join(HYBRID_KINDS)} "
                            f"or a Linear's name: {', '.join(leaf_names)}.")
        if not chosen and target != "all":
            raise UserError(f"adapter target {target!r} matches no Linear of this hybrid model.")
        for name in chosen:
            modules.setdefault(name, target)
    return mamba, modules


def coverage(linears: dict[str, str], modules: dict[str, str], n_mixers: int,
             n_adapted_mixers: int) -> str:
    """One line per layer kind: how many of its modules hold adapters."""
    parts = [f"Mamba mixers {n_adapted_mixers}/{n_mixers}"]
    for kind in HYBRID_KINDS:
        total = sum(1 for k in linears.values() if k == kind)
        adapted = sum(1 for n in modules if linears[n] == kind)
        parts.append(f"{kind} Linears {adapted}/{total}")
    return "hybrid model, adapted: " + ", ".join(parts) + "."
