"""What to adapt: `AdapterConfig`, and the vocabulary of Mamba adapter targets.

One configuration serves both model families. For a Mamba model the targets are the names in
`MAMBA_TARGETS` (plus the aliases `all_linear` and `all`); for a Transformer baseline they are
the model's own module names (`query_key_value`, `dense`, ...), plus `embeddings` / `lm_head`
/ `all_linear` / `all`, and mamba-ft hands them to PEFT. Names are checked against the model
when adapters are attached; a list naming a Mamba-only target is checked here already, so a
typo in a Mamba recipe fails at `mamba-ft validate` time.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from mamba_ft.errors import did_you_mean

# Per-mixer targets carried as a low-rank delta scale * B @ A on a weight matrix.
LOW_RANK_MIXER_TARGETS = ("in_proj", "conv1d", "x_proj", "x_proj.dt", "x_proj.B", "x_proj.C",
                          "dt_proj", "out_proj")
# Per-mixer recurrence parameters carried as a full, zero-initialised additive delta (fp32).
SSM_TARGETS = ("A_log", "D", "dt_bias")
# Model-level targets (outside the mixers, not restricted by `layers`).
MODEL_TARGETS = ("embeddings", "lm_head")
MAMBA_TARGETS = LOW_RANK_MIXER_TARGETS + SSM_TARGETS + MODEL_TARGETS

# x_proj's output rows are [dt (time_step_rank) | B (state_size) | C (state_size)].
X_PROJ_BLOCKS = ("x_proj.dt", "x_proj.B", "x_proj.C")

ALIASES = {
    # Every Linear of every mixer.
    "all_linear": ("in_proj", "x_proj", "dt_proj", "out_proj"),
    # Every buffer of every mixer (not the embeddings or the head: name those explicitly).
    "all": ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj") + SSM_TARGETS,
}

# Names that exist only in Mamba mixers: a list containing one is a Mamba configuration.
_MAMBA_ONLY = {"conv1d", "x_proj", "dt_proj", *X_PROJ_BLOCKS, *SSM_TARGETS}


def valid_mamba_targets_text() -> str:
    return ", ".join(MAMBA_TARGETS + tuple(ALIASES))


def unknown_mamba_target(name: str) -> str:
    return (f"Unknown adapter target {name!r}.{did_you_mean(name, MAMBA_TARGETS + tuple(ALIASES))} "
            f"Valid targets for a Mamba model: {valid_mamba_targets_text()}.")


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
                if name not in MAMBA_TARGETS and name not in ALIASES:
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
        expanded = self.expanded_targets()
        if "x_proj" in expanded:
            blocks = [t for t in expanded if t in X_PROJ_BLOCKS]
            if blocks:
                raise ValueError(f"adapter targets name x_proj (whole) and its row block {blocks[0]!r}; "
                                 f"keep one of them (the blocks split x_proj's rows)")
        for name, rank in self.rank_per_target.items():
            if name in SSM_TARGETS:
                raise ValueError(f"rank_per_target names {name!r}, a full additive delta without a "
                                 f"rank; remove it from rank_per_target")
            if name not in expanded:
                raise ValueError(f"rank_per_target names {name!r}, which is not among the adapter "
                                 f"targets {expanded}.{did_you_mean(name, expanded)}")
            if rank <= 0:
                raise ValueError(f"rank_per_target[{name!r}] must be a positive integer, not {rank}")
        return self

    def expanded_targets(self) -> list[str]:
        """Targets with the aliases replaced by what they stand for, in a stable order."""
        out: list[str] = []
        for name in self.targets:
            for item in ALIASES.get(name, (name,)):
                if item not in out:
                    out.append(item)
        return out

    def rank_for(self, target: str) -> int:
        return self.rank_per_target.get(target, self.rank)

    def scale_for(self, target: str) -> float:
        return self.alpha / self.rank_for(target)
