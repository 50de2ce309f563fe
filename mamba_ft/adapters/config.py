"""What to adapt: `AdapterConfig`, and the vocabulary of adapter targets of each Mamba family.

One configuration serves every model family. For a Mamba model the targets are the names of
its family's `TargetFamily` (Mamba-1: `MAMBA1`, Mamba-2: `MAMBA2`), plus the aliases
`all_linear` and `all`, which each family expands to its own sets; for a Transformer baseline
they are the model's own module names (`query_key_value`, `dense`, ...), plus `embeddings` /
`lm_head` / `all_linear` / `all`, and mamba-ft hands them to PEFT. Names are checked against
the model when adapters are attached; a list naming a Mamba-only target (of any family) is
checked here already against every family's names, so a typo in a Mamba recipe fails at
`mamba-ft validate` time. Which mixer class has which family is decided in `families.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from mamba_ft.errors import UserError, did_you_mean

# Model-level targets (outside the mixers, not restricted by `layers`).
MODEL_TARGETS = ("embeddings", "lm_head")


@dataclass(frozen=True)
class TargetFamily:
    """The adapter targets of one mixer family: pure names, no modules.

    low_rank: per-mixer targets carried as a low-rank delta scale * B @ A on a weight matrix;
    full_delta: per-mixer tensors carried as a full, zero-initialised additive delta (fp32,
    no rank); blocks: a whole target -> the row blocks it splits into (a list may name the
    whole or its blocks, not both); aliases: `all_linear` and `all` for this family; peft: the
    targets plain PEFT applies correctly on transformers' model (they go to PEFT's file, the
    rest to mamba-ft's own).
    """

    name: str
    model_type: str
    low_rank: tuple[str, ...]
    full_delta: tuple[str, ...]
    aliases: dict[str, tuple[str, ...]]
    peft: tuple[str, ...]
    blocks: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def mixer_targets(self) -> tuple[str, ...]:
        return self.low_rank + self.full_delta

    @property
    def targets(self) -> tuple[str, ...]:
        return self.low_rank + self.full_delta + MODEL_TARGETS

    def expand(self, names) -> list[str]:
        """Names with this family's aliases replaced by what they stand for, in a stable order."""
        out: list[str] = []
        for name in names:
            for item in self.aliases.get(name, (name,)):
                if item not in out:
                    out.append(item)
        return out

    def valid_text(self) -> str:
        return ", ".join(self.targets + tuple(self.aliases))

    def unknown(self, name: str) -> str:
        return (f"Unknown adapter target {name!r} for a {self.name} model."
                f"{did_you_mean(name, self.targets + tuple(self.aliases))} "
                f"Valid targets for a {self.name} model: {self.valid_text()}.")


MAMBA1 = TargetFamily(
    name="Mamba-1",
    model_type="mamba",
    low_rank=("in_proj", "conv1d", "x_proj", "x_proj.dt", "x_proj.B", "x_proj.C", "dt_proj",
              "out_proj"),
    full_delta=("A_log", "D", "dt_bias"),
    aliases={
        # Every Linear of every mixer.
        "all_linear": ("in_proj", "x_proj", "dt_proj", "out_proj"),
        # Every buffer of every mixer (not the embeddings or the head: name those explicitly).
        "all": ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj", "A_log", "D", "dt_bias"),
    },
    # x_proj's output rows are [dt (time_step_rank) | B (state_size) | C (state_size)].
    blocks={"x_proj": ("x_proj.dt", "x_proj.B", "x_proj.C")},
    peft=("in_proj", "x_proj", "embeddings", "lm_head"),
)

MAMBA2 = TargetFamily(
    name="Mamba-2",
    model_type="mamba2",
    low_rank=("in_proj", "in_proj.z", "in_proj.x", "in_proj.B", "in_proj.C", "in_proj.dt",
              "conv1d", "out_proj"),
    # `norm` is the gated RMSNorm's weight (d_inner,): a vector, so a full delta like the SSM's.
    full_delta=("norm", "A_log", "D", "dt_bias"),
    aliases={
        "all_linear": ("in_proj", "out_proj"),
        "all": ("in_proj", "conv1d", "out_proj", "norm", "A_log", "D", "dt_bias"),
    },
    # in_proj's output rows are [z (d_inner) | x (d_inner) | B (groups*N) | C (groups*N) | dt (heads)].
    blocks={"in_proj": ("in_proj.z", "in_proj.x", "in_proj.B", "in_proj.C", "in_proj.dt")},
    # PEFT refuses out_proj and conv1d on mamba2 and cannot wrap the gated norm.
    peft=("in_proj", "embeddings", "lm_head"),
)

# Zamba's Mamba-1 mixer (heads; x_proj / dt_proj raw parameters stacked per head) takes
# Mamba-1's targets, each low-rank delta on x_proj, its row blocks and dt_proj per head. PEFT
# has no LoRA for raw parameters, and transformers' Zamba calls in_proj and out_proj as modules
# (and PEFT does not refuse out_proj for it), so those two and the model targets go to PEFT's
# file. Its vocabulary is Mamba-1's, so it is not one more family in TARGET_FAMILIES.
ZAMBA = dataclasses.replace(MAMBA1, name="Zamba (Mamba-1 heads)", model_type="zamba",
                            peft=("in_proj", "out_proj", "embeddings", "lm_head"))

TARGET_FAMILIES = (MAMBA1, MAMBA2)

# Mamba-1's names, as before Mamba-2 (kept for callers that list them).
LOW_RANK_MIXER_TARGETS = MAMBA1.low_rank
SSM_TARGETS = MAMBA1.full_delta
MAMBA_TARGETS = MAMBA1.targets
X_PROJ_BLOCKS = MAMBA1.blocks["x_proj"]
ALIASES = MAMBA1.aliases
# Every name any Mamba family knows, and the full-delta (rankless) ones among them.
ALL_MAMBA_TARGETS = tuple(dict.fromkeys(t for f in TARGET_FAMILIES for t in f.targets))
FULL_DELTA_TARGETS = tuple(dict.fromkeys(t for f in TARGET_FAMILIES for t in f.full_delta))
ALIAS_NAMES = tuple(dict.fromkeys(a for f in TARGET_FAMILIES for a in f.aliases))

# A hybrid's non-Mamba layer kinds, each a target naming every Linear of that kind
# (`adapters/hybrid.py`); they may stand beside Mamba targets in one list.
HYBRID_KINDS = ("attention", "mlp")
# The names of the Linears in the supported hybrids' attention and MLP layers, so a list that
# mixes them with Mamba-only targets is still checked here (tests/models/test_model_types.py
# holds this list equal to what the models have).
HYBRID_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj", "gate_up_proj", "input_linear", "output_linear")

# Names that exist only in Mamba mixers: a list containing one is a Mamba configuration.
_SHARED_WITH_TRANSFORMERS = {"in_proj", "out_proj", *MODEL_TARGETS}
_MAMBA_ONLY = set(ALL_MAMBA_TARGETS) - _SHARED_WITH_TRANSFORMERS


def valid_mamba_targets_text() -> str:
    return "; ".join(f"{f.name}: {f.valid_text()}" for f in TARGET_FAMILIES)


def unknown_mamba_target(name: str) -> str:
    known = ALL_MAMBA_TARGETS + ALIAS_NAMES + HYBRID_KINDS + HYBRID_LINEAR_NAMES
    return (f"Unknown adapter target {name!r}.{did_you_mean(name, known)} "
            f"Valid targets for a Mamba model: {valid_mamba_targets_text()}; beside them a "
            f"hybrid's other layers take {', '.join(HYBRID_KINDS)} or their Linears' names "
            f"({', '.join(HYBRID_LINEAR_NAMES)}).")


class AdapterConfig(BaseModel):
    """LoRA-style adapters: which buffers, which rank, which layers.

    scale = alpha / rank (per target, with `rank_per_target`), as in PEFT. `dropout` acts on
    the input of side-path adapters (in_proj, out_proj, lm_head); adapters folded into an
    effective weight (x_proj, dt_proj, conv1d) have no input of their own to drop.
    """

    model_config = ConfigDict(extra="forbid")

    targets: list[str]
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rank_per_target: dict[str, int] = {}
    layers: list[int] | None = None  # None: every layer

    @field_validator("targets")
    @classmethod
    def _targets(cls, targets: list[str]) -> list[str]:
        if not targets:
            raise ValueError(f"adapter targets is empty; name at least one. Valid targets for a "
                             f"Mamba model: {valid_mamba_targets_text()}")
        duplicates = sorted({t for t in targets if targets.count(t) > 1})
        if duplicates:
            raise ValueError(f"adapter target {duplicates[0]!r} is listed twice")
        if any(t in _MAMBA_ONLY for t in targets):
            for name in targets:
                if name not in ALL_MAMBA_TARGETS + ALIAS_NAMES + HYBRID_KINDS + HYBRID_LINEAR_NAMES:
                    raise ValueError(unknown_mamba_target(name))
        return targets

    @field_validator("rank")
    @classmethod
    def _rank(cls, rank: int) -> int:
        if rank <= 0:
            raise ValueError(f"adapter rank must be a positive integer, not {rank}")
        return rank

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, alpha: float) -> float:
        if not alpha > 0:
            raise ValueError(f"adapter alpha must be positive, not {alpha}")
        return alpha

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, dropout: float) -> float:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), not {dropout}")
        return dropout

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[int] | None) -> list[int] | None:
        if layers is None:
            return None
        if not layers:
            raise ValueError("adapter layers is an empty list; leave it out (null) for every layer")
        if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"adapter layers must be distinct layer indices >= 0, not {layers}")
        return sorted(layers)

    @model_validator(mode="after")
    def _consistent(self) -> "AdapterConfig":
        # The family is not known before the model is: check what holds in every family here
        # (TargetFamily checks the rest when the adapters are attached: `check_for`).
        expansions = [family.expand(self.targets) for family in TARGET_FAMILIES]
        for family, expanded in zip(TARGET_FAMILIES, expansions):
            self._whole_and_blocks(family, expanded, ValueError)
        union = list(dict.fromkeys(t for expanded in expansions for t in expanded))
        for name, rank in self.rank_per_target.items():
            if name in FULL_DELTA_TARGETS:
                raise ValueError(f"rank_per_target names {name!r}, a full additive delta without a "
                                 f"rank; remove it from rank_per_target")
            if name not in union:
                raise ValueError(f"rank_per_target names {name!r}, which is not among the adapter "
                                 f"targets {union}.{did_you_mean(name, union)}")
            if rank <= 0:
                raise ValueError(f"rank_per_target[{name!r}] must be a positive integer, not {rank}")
        return self

    @staticmethod
    def _whole_and_blocks(family: TargetFamily, expanded: list[str], error) -> None:
        for whole, blocks in family.blocks.items():
            named = [t for t in expanded if t in blocks]
            if whole in expanded and named:
                raise error(f"adapter targets name {whole} (whole) and its row block {named[0]!r}; "
                            f"keep one of them (the blocks split {whole}'s rows)")

    def check_for(self, family: TargetFamily) -> list[str]:
        """The targets expanded for `family`, each checked against it (UserError); for attaching."""
        expanded = family.expand(self.targets)
        for name in expanded:
            if name not in family.targets:
                raise UserError(family.unknown(name))
        self._whole_and_blocks(family, expanded, UserError)
        for name in self.rank_per_target:
            if name not in expanded:
                raise UserError(f"rank_per_target names {name!r}, which is not among this "
                                f"{family.name} model's adapter targets {expanded}."
                                f"{did_you_mean(name, expanded)}")
        return expanded

    def expanded_targets(self, family: TargetFamily = MAMBA1) -> list[str]:
        """Targets with the aliases replaced by what they stand for (Mamba-1's by default)."""
        return family.expand(self.targets)

    def rank_for(self, target: str) -> int:
        return self.rank_per_target.get(target, self.rank)

    def scale_for(self, target: str) -> float:
        return self.alpha / self.rank_for(target)
