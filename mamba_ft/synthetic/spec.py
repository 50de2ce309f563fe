"""The synthetic-experiment file (recipes/synthetic/*.yaml): what to generate, which models to
train, how, and what to sweep.

A file (or a bare task name, which takes every default) plus dotted `key=value` overrides is
validated here; unknown keys and out-of-range values are one `UserError` each. Lists under
`models.mamba` (d_model, d_state) are sweeps: every combination is trained; one Transformer is
trained per Mamba width and position encoding (`models.transformer.position`), sized to match
the Mamba of that width at `match_d_state`.

Two state-size designs (Ren et al.: a constant state cannot COPY, a state linear in the length
can):
- `models.mamba.d_state_per_length: k` adds, per width, a *length-scaled* Mamba whose d_state
  is ceil(k x L), L the longest length it is trained on, so its state floats grow linearly in L.
- `train_max_lengths: [L1, L2, ...]` trains every model once per L, on lengths
  [train_lengths[0], L], each L a group of its own (in range and out of range measured from its
  L); with `d_state_per_length` the scaled Mamba of each group has the state of that L.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mamba_ft.errors import UserError, did_you_mean
from mamba_ft.recipe import apply_override, read_yaml_mapping, validate_mapping
from mamba_ft.synthetic.tasks import make_task, task_names


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


MAX_D_STATE = 1024  # model_configs.mamba_config's limit


class MambaSweep(_Section):
    d_model: list[int] = [64]
    d_state: list[int] = [16]
    # Length-scaled Mambas: one per width and factor k, with d_state = ceil(k x L) for L the
    # longest training length of its group (see `train_max_lengths`). Empty: none.
    d_state_per_length: list[float] = []
    n_layer: int = Field(2, ge=1, le=128)
    expand: int = Field(2, ge=1, le=8)

    @field_validator("d_model", "d_state", "d_state_per_length", mode="before")
    @classmethod
    def _as_list(cls, value):
        return value if isinstance(value, list) else [value]

    @field_validator("d_model")
    @classmethod
    def _positive(cls, values):
        if not values or any(v < 1 for v in values):
            raise ValueError("must be a non-empty list of positive integers")
        return values

    @field_validator("d_state")
    @classmethod
    def _positive_states(cls, values):
        if any(v < 1 for v in values):
            raise ValueError("must be a list of positive integers")
        return values

    @field_validator("d_state_per_length")
    @classmethod
    def _positive_factors(cls, values):
        if any(not v > 0 or math.isinf(v) for v in values) or len(set(values)) != len(values):
            raise ValueError("must be a list of distinct positive numbers (d_state per unit of training "
                             "length, e.g. 0.5)")
        return values

    @staticmethod
    def scaled_d_state(per_length: float, length: int) -> int:
        """The d_state of a length-scaled Mamba trained up to `length`: ceil(per_length x length),
        rounded to 6 decimals first so that 0.1 x 30 is 3, not 4."""
        return max(1, math.ceil(round(per_length * length, 6)))

    @model_validator(mode="after")
    def _some_state(self):
        if not self.d_state and not self.d_state_per_length:
            raise ValueError("d_state must be a non-empty list of positive integers (it may be [] only "
                             "beside d_state_per_length)")
        return self


class TransformerSpec(_Section):
    family: Literal["llama", "gpt_neox"] = "llama"
    n_layer: int = Field(2, ge=1, le=128)
    head_dim: int = Field(16, ge=2, le=256)
    match_d_state: int | None = Field(None, description="size-match the Mamba with this d_state (default: the first)")
    # A sweep like d_state: one Transformer per width and position encoding, all of one family,
    # so a RoPE and a NoPE model differ in nothing else.
    position: list[Literal["rope", "nope", "hard_alibi"]] = ["rope"]
    # hard_alibi only: the windowed heads' sizes (the head sees itself and window - 1 tokens
    # back); the remaining heads, at least one, are NoPE. Our default, not a paper's.
    hard_alibi_windows: list[int] = [2, 4]

    @field_validator("position", mode="before")
    @classmethod
    def _position_list(cls, value):
        return value if isinstance(value, list) else [value]

    @model_validator(mode="after")
    def _check_position(self):
        if not self.position or len(set(self.position)) != len(self.position):
            raise ValueError("position must be a non-empty list of distinct encodings (rope, nope, hard_alibi)")
        for position in self.position:
            if position != "rope" and self.family != "gpt_neox":
                raise ValueError(f"position {position!r} needs family 'gpt_neox' ({self.family} always "
                                 f"applies rotary embeddings)")
        if not self.hard_alibi_windows or min(self.hard_alibi_windows) < 1:
            raise ValueError("hard_alibi_windows must be a non-empty list of positive window sizes")
        return self


class ModelsSpec(_Section):
    mamba: MambaSweep | None = MambaSweep()
    transformer: TransformerSpec | None = TransformerSpec()

    @model_validator(mode="after")
    def _some_model(self):
        if self.mamba is None and self.transformer is None:
            raise ValueError("train at least one of 'mamba' or 'transformer'")
        if self.mamba is None:
            raise ValueError("the Transformer is sized to match a Mamba; keep a 'mamba' section")
        if self.transformer is not None and not self.mamba.d_state and self.transformer.match_d_state is None:
            raise ValueError("with models.mamba.d_state empty, set models.transformer.match_d_state (the "
                             "d_state of the Mamba the Transformer is sized to match)")
        return self


class TrainingSpec(_Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Seeds of model init and batch order; every model is trained once per seed on the same
    # data (fixed by the top-level `seed`). None: one run, with `seed`.
    seeds: list[int] | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, values):
        if values is not None and (not values or len(set(values)) != len(values) or min(values) < 0):
            raise ValueError("must be a non-empty list of distinct integers >= 0")
        return values


class SynthSpec(_Section):
    task: str
    task_args: dict = {}
    variants: list[dict] = Field([{}], description="task_args overrides; each is a separate run")
    train_lengths: tuple[int, int] = Field(description="[shortest, longest] training length")
    # A sweep of training ranges: every model is trained once per L, on [train_lengths[0], L].
    # The largest L must be train_lengths[1]. None: one range, train_lengths.
    train_max_lengths: list[int] | None = None
    test_lengths: list[int]
    n_train: int = Field(10_000, ge=1)
    n_test: int = Field(100, ge=1)
    seed: int = 0
    models: ModelsSpec = ModelsSpec()
    training: TrainingSpec = TrainingSpec()
    eval_batch_size: int = Field(64, ge=1)
    decoding: list[Literal["teacher_forced", "greedy"]] = ["teacher_forced", "greedy"]

    @model_validator(mode="after")
    def _check_task(self):
        lo, hi = self.train_lengths
        if lo > hi:
            raise ValueError(f"train_lengths [{lo}, {hi}]: the shortest must not exceed the longest")
        if not self.test_lengths:
            raise ValueError("test_lengths must list at least one length")
        if not self.variants:
            raise ValueError("variants must hold at least one entry ({} for the plain task)")
        if self.train_max_lengths is not None:
            maxima = self.train_max_lengths
            if not maxima or len(set(maxima)) != len(maxima) or max(maxima) != hi or min(maxima) < lo:
                raise ValueError(f"train_max_lengths {maxima} must be distinct longest training lengths, each "
                                 f"in train_lengths [{lo}, {hi}], the largest equal to {hi}")
        mamba = self.models.mamba
        for per_length in mamba.d_state_per_length if mamba is not None else []:
            d_state = mamba.scaled_d_state(per_length, max(self.max_lengths()))
            if d_state > MAX_D_STATE:
                raise ValueError(f"models.mamba.d_state_per_length {per_length} gives d_state {d_state} at "
                                 f"training length {max(self.max_lengths())}, above the largest Mamba state "
                                 f"{MAX_D_STATE}; use a smaller factor or shorter lengths")
        return self

    def max_lengths(self) -> list[int]:
        """The longest training length of each training range (one, without `train_max_lengths`)."""
        return list(self.train_max_lengths) if self.train_max_lengths is not None else [self.train_lengths[1]]

    def training_seeds(self) -> list[int]:
        return self.training.seeds if self.training.seeds is not None else [self.seed]

    def tasks(self):
        """(variant label, task) per variant; every parameter and length checked."""
        out = []
        for variant in self.variants:
            task = make_task(self.task, **{**self.task_args, **variant})
            for length in self.train_lengths:
                task.check_length(length, "Training length")
            for length in self.test_lengths:
                task.check_length(length, "Test length")
            label = ",".join(f"{k}={v}" for k, v in variant.items()) or self.task
            out.append((label, task))
        return out


# Defaults for `mamba-ft synth TASK` without a file: CPU-sized, a few minutes at most.
TASK_DEFAULTS = {
    "copy": {"train_lengths": [1, 10], "test_lengths": [5, 10, 20, 40]},
    "prefix_ngram": {"train_lengths": [8, 20], "test_lengths": [10, 20, 40, 80]},
    "suffix_ngram": {"train_lengths": [8, 20], "test_lengths": [10, 20, 40, 80]},
    "mqar": {"task_args": {"keys": 64, "values": 64}, "train_lengths": [2, 8], "test_lengths": [4, 8, 16, 32]},
    # Zoology's vocabulary is 8192 (the task's default); an output layer that wide is most of a
    # CPU training step, so the bare task name takes 512.
    "mqar_zoology": {"task_args": {"vocab_size": 512}, "train_lengths": [2, 8], "test_lengths": [4, 8, 16, 32]},
    "arithmetic": {"variants": [{"form": "direct"}, {"form": "cot"}], "train_lengths": [1, 4],
                   "test_lengths": [2, 4, 6]},
    "lis": {"variants": [{"form": "direct"}, {"form": "cot"}], "train_lengths": [2, 10],
            "test_lengths": [5, 10, 15]},
    "dp_local": {"variants": [{"form": "direct"}, {"form": "cot"}], "train_lengths": [2, 16],
                 "test_lengths": [8, 16, 24, 32]},
    # lag 8: half the longest training length, so the far dependency spans half the trace.
    "dp_nonlocal": {"task_args": {"lag": 8}, "variants": [{"form": "direct"}, {"form": "cot"}],
                    "train_lengths": [2, 16], "test_lengths": [8, 16, 24, 32]},
}


def load_spec(target: str, overrides: list[str] | None = None) -> SynthSpec:
    """A spec from a YAML file, or from a task name with its defaults; then the overrides."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"Synthetic recipe {target!r} does not exist; pass a YAML file (see "
                            f"recipes/synthetic/) or a task name: {', '.join(task_names())}.")
        data = read_yaml_mapping(path, "Synthetic recipe", "task, train_lengths, ...")
        where = str(path)
    else:
        if target not in TASK_DEFAULTS:
            raise UserError(f"Unknown synthetic task {target!r}; choose one of: {', '.join(task_names())}, "
                            f"or pass a recipe file." + did_you_mean(target, TASK_DEFAULTS))
        data = {"task": target, **yaml.safe_load(yaml.safe_dump(TASK_DEFAULTS[target]))}
        where = f"the defaults of task {target!r}"
    for item in overrides or []:
        apply_override(data, item)
    spec = validate_mapping(SynthSpec, data, where, what="Synthetic recipe", docs="docs/synthetic.md")
    tasks = spec.tasks()  # task name, task parameters and lengths: UserError on anything out of range
    if spec.models.transformer is not None and "hard_alibi" in spec.models.transformer.position:
        # Whether the windows leave a NoPE head depends on the matched width: plan the models
        # now, so a bad setting stops before any output is written.
        from mamba_ft.synthetic.plan import plan_models

        for _, task in tasks:
            plan_models(spec, task, max_positions=1)
    return spec
