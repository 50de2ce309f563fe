"""Recipes: the YAML file that drives `mamba-ft train`, validated by pydantic.

Every section forbids unknown keys, so a typo is an error with a did-you-mean instead of a
silently ignored setting; a wrong type names its dotted key path. Command-line overrides are
dotted `key.path=value` pairs whose values are parsed as YAML (`optim.lr=1e-4`,
`adapter=none`, `data.packing=true`). docs/recipes.md documents every key.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mamba_ft.adapters import AdapterConfig
from mamba_ft.errors import UserError, did_you_mean
from mamba_ft.models.quantize import QuantizeConfig
from mamba_ft.precision import PrecisionPolicy


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    source: str | dict = Field(description="checkpoint dir, hub id, config file (.json/.yaml), "
                                           "bundled:NAME, or an inline config mapping (random init)")
    tokenizer: str | None = Field(None, description="where the tokenizer comes from, when not beside the weights")
    kind: Literal["auto", "mamba", "transformer"] = "auto"
    init_seed: int | None = Field(None, description="seed for random init when source is a config")
    recompute_ssm: bool = Field(False, description="Mamba only: run each mixer's conv -> scan branch "
                                                   "again in the backward instead of storing it "
                                                   "(Mamba-1.4B LoRA batch 2: peak 20.1 -> 17.1 GiB, 8-32% fewer tokens/s)")
    checkpoint_blocks: bool = Field(False, description="recompute each block's forward in the "
                                                      "backward (transformers' gradient "
                                                      "checkpointing): activation memory of one "
                                                      "block instead of all, about one more "
                                                      "forward of compute")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig,
                                     description="Mamba only: base weights in nf4 / fp4 / int8 "
                                                 "(bitsandbytes, QLoRA; docs/quantization.md)")


_FROZEN_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class PrecisionSection(Section):
    mode: Literal["fp32", "bf16", "fp16"] = "fp32"
    frozen_base: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype the frozen base weights are kept in while adapters train; the "
                            "recurrence parameters, norms and adapters stay fp32. bf16 halves the "
                            "base weights' memory and saves casting them at every step under bf16 "
                            "autocast.")
    tf32: bool = False
    fp16_init_scale: float = 2.0 ** 16


class IclRulesData(Section):
    """Generate the in-context rule-learning corpus (mamba_ft.rules) in memory."""

    n_documents: int = Field(gt=0)
    seed: int = 0
    min_demos: int = Field(4, gt=0)
    max_demos: int = Field(12, gt=0)
    substitution_fraction: float = Field(0.0, ge=0.0, le=1.0)


class DataSource(Section):
    path: str | None = Field(None, description="jsonl/json/csv/parquet/txt file, a datasets dir, bundled:FILE or a hub name")
    split: str = "train"
    icl_rules: IclRulesData | None = None
    limit: int | None = Field(None, gt=0, description="keep only the first N examples")

    @model_validator(mode="after")
    def _one_origin(self):
        if (self.path is None) == (self.icl_rules is None):
            raise ValueError("give exactly one of 'path' or 'icl_rules'")
        return self


class DataSection(Section):
    format: Literal["text", "completion", "alpaca", "chat"] = "text"
    train: DataSource
    eval: DataSource | None = None
    max_length: int = Field(512, gt=1)
    packing: bool = False
    add_eos: bool = True
    train_on_prompt: bool = False


class OptimSection(Section):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = Field(1.0, gt=0)


class ScheduleSection(Section):
    kind: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class RunSection(Section):
    output_dir: str
    max_steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    micro_batch_size: int = Field(8, gt=0, description="per process")
    grad_accum_steps: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0, description="steps between evals; 0 = only before and after")
    eval_batches: int | None = Field(None, gt=0, description="cap on eval micro-batches")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = none")
    keep_last: int = Field(2, gt=0)
    seed: int = 0
    resume: str | None = Field(None, description="'auto', a checkpoint dir, or null")
    overwrite: bool = False
    save_final: bool = True
    merge_at_end: bool = False
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto", description="replay each micro-step as one CUDA graph (one GPU; micro-batches "
                            "padded to data.max_length). auto: on where it is known to be safe "
                            "and to pay (mamba_ft/training/graph_decision.py); true: always, "
                            "refused where unsupported; false: never")
    chunked_head_loss: bool = Field(False, description="run the output head inside the loss a "
                                                       "chunk of rows at a time, so the (batch, "
                                                       "L, vocab) logits never exist (one "
                                                       "process; not with cuda_graphs)")
    compile: bool = Field(False, description="torch.compile the model's forward and backward "
                                             "(nn.Module.compile: Dynamo traces mamba-ft's mixers "
                                             "in one graph); not with cuda_graphs or model.quantize")

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _auto_or_bool(cls, value):
        # One clear message instead of pydantic's two, one per member of the union.
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("must be auto, true or false")

    @property
    def cuda_graphs_forced(self) -> bool:
        """`cuda_graphs: true`: graphs asked for outright, so every unsupported setting is an error."""
        return self.cuda_graphs is True

    @model_validator(mode="after")
    def _length(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of 'max_steps' or 'epochs'")
        return self


class LoggingSection(Section):
    every: int = Field(1, gt=0)
    progress_bar: bool = True
    plot: bool = True
    tensorboard: bool = False
    wandb_project: str | None = None


# The ICL sweep's defaults; evaluation reads them from here.
DEFAULT_SHOTS = (0, 1, 3, 5)
DEFAULT_SEEDS = (1234, 1235, 1236)
# lm-eval's bootstrap_iters for the scores' standard errors. acc and acc_norm get lm-eval's
# closed-form error whenever this is > 0; only bootstrapped metrics (perplexity, ...) resample,
# and 1,000 resamples estimate an error to about 2% (1/sqrt(2·1000)) where lm-eval's own
# 100,000 can take minutes per call on a large task.
DEFAULT_BOOTSTRAP_ITERS = 1000


class IclSweepConfig(BaseModel):
    """A recipe's `evaluation.icl_sweep` section: the sweep to run after training.

    The fine-tuned model is evaluated in memory as "fine-tuned"; with `compare_base` its base
    checkpoint is evaluated too (the "before" numbers, without training twice); `baselines`
    adds other models (label -> path), e.g. a Transformer fine-tuned the same way, and the
    first of them is what ratios divide by (else the base model).
    """

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = ["mamba_ft_icl"]
    shots: list[int] = list(DEFAULT_SHOTS)
    seeds: list[int] = list(DEFAULT_SEEDS)
    limit: int | float | None = None
    compare_base: bool = True
    baselines: dict[str, str] = {}
    batch_size: int = Field(8, gt=0)
    # lm-eval's standard errors per score, and with them intervals on gains and ratios; 0: off
    bootstrap_iters: int = Field(DEFAULT_BOOTSTRAP_ITERS, ge=0, strict=True)


class IclRulesEval(Section):
    """Few-shot accuracy on held-out icl_rules queries, scored by choosing among rule outputs."""

    shots: list[int] = [0, 1, 3, 5]
    queries_per_rule: int = Field(20, gt=0)
    seed: int = 1234


class EvaluationSection(Section):
    icl_rules: IclRulesEval | None = None
    # The lm-eval few-shot sweep after training (needs the `eval` extra): fine-tuned model,
    # its base ("before") and any baselines; writes output_dir/icl/ and logs the gain.
    icl_sweep: IclSweepConfig | None = None


class Recipe(Section):
    model: ModelSection
    adapter: AdapterConfig | None = None
    precision: PrecisionSection = PrecisionSection()
    data: DataSection
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    run: RunSection
    logging: LoggingSection = LoggingSection()
    evaluation: EvaluationSection = EvaluationSection()

    @field_validator("adapter", mode="before")
    @classmethod
    def _none_means_full(cls, value):
        return None if isinstance(value, str) and value.lower() == "none" else value

    @model_validator(mode="before")
    @classmethod
    def _frozen_dtype_moved(cls, data):
        # adapter.frozen_dtype (float32 / bfloat16 / float16) is precision.frozen_base now.
        adapter = data.get("adapter") if isinstance(data, dict) else None
        if isinstance(adapter, dict) and "frozen_dtype" in adapter:
            adapter = dict(adapter)
            old = adapter.pop("frozen_dtype")
            new = _FROZEN_DTYPE_NAMES.get(old, old)
            precision = dict(data.get("precision") or {})
            if precision.setdefault("frozen_base", new) != new:
                raise ValueError(f"adapter.frozen_dtype {old} and precision.frozen_base "
                                 f"{precision['frozen_base']} disagree; keep precision.frozen_base only")
            print(f"mamba-ft: notice: adapter.frozen_dtype has moved to precision.frozen_base "
                  f"(adapter.frozen_dtype: {old} is read as precision.frozen_base: {new}).",
                  file=sys.stderr)
            data = {**data, "adapter": adapter, "precision": precision}
        return data

    @model_validator(mode="after")
    def _precision_fits(self):
        try:
            self.precision_policy().check(adapter=self.adapter is not None,
                                          merge_at_end=self.run.merge_at_end,
                                          cuda_graphs=self.run.cuda_graphs_forced)
        except UserError as exc:
            raise ValueError(str(exc).rstrip(".")) from None
        return self

    @model_validator(mode="after")
    def _quantized_base_needs_adapter(self):
        # A quantised weight takes no gradient; full fine-tuning would silently train only the
        # rest. CUDA graphs are refused until dequantising inside a captured graph is tested.
        quantize = self.model.quantize
        if quantize.enabled and self.adapter is None:
            raise ValueError(f"model.quantize {quantize.kind} keeps the base weights frozen in "
                             f"{quantize.kind}; add an adapter section (QLoRA), or set "
                             f"model.quantize: none to fine-tune the whole model")
        if quantize.enabled and self.run.cuda_graphs_forced:
            raise ValueError("run.cuda_graphs is not supported with model.quantize yet; set "
                             "run.cuda_graphs: false")
        return self

    @model_validator(mode="after")
    def _compile_alone(self):
        # Each combination is refused until it is tested: a CUDA graph would capture compiled
        # code, and bitsandbytes' dequantisation has not been traced.
        if self.run.compile and self.run.cuda_graphs_forced:
            raise ValueError("run.compile and run.cuda_graphs together are not supported; set one "
                             "of them to false")
        if self.run.compile and self.model.quantize.enabled:
            raise ValueError(f"run.compile is not supported with model.quantize "
                             f"{self.model.quantize.kind} yet; set run.compile: false")
        return self

    def precision_policy(self) -> PrecisionPolicy:
        return PrecisionPolicy.from_section(self.precision)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply dotted overrides, validate; any mistake is one UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Recipe file {str(path)!r} does not exist; pass the path of a YAML recipe "
                        f"(see recipes/ for examples).")
    data = read_yaml_mapping(path, "Recipe", "sections: model, data, run, ...")
    for item in overrides or []:
        apply_override(data, item)
    return validate_recipe(data, where=str(path))


def read_yaml_mapping(path: Path, what: str, expected: str) -> dict:
    """The mapping in a YAML file (safe_load: no code runs); UserError for anything else."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping ({expected}).")
    return data


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict, the value parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"Override {item!r} is not of the form key.path=value, e.g. optim.lr=1e-4.")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            if child is not None and not (isinstance(child, str) and child.lower() == "none"):
                raise UserError(f"Override {item!r}: {'.'.join(parts[:depth + 1])} is a value, "
                                f"not a section.")
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def validate_recipe(data: dict, where: str = "recipe") -> Recipe:
    return validate_mapping(Recipe, data, where)


def validate_mapping(schema: type[BaseModel], data: dict, where: str, what: str = "Recipe",
                     docs: str = "docs/recipes.md"):
    """`schema.model_validate(data)`, with the first error as one UserError naming the key path
    (and, for an unknown key, the closest known one)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise UserError(_describe(exc.errors()[0], where, schema, what, docs)) from None


def _describe(error: dict, where: str, schema: type[BaseModel], what: str, docs: str) -> str:
    loc = [part for part in error["loc"] if isinstance(part, (str, int))]
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        fields = _fields_at(schema, loc[:-1])
        hint = did_you_mean(str(loc[-1]), fields) if fields else ""
        known = f" Known keys here: {', '.join(fields)}." if fields and not hint else ""
        return f"Unknown {what.lower()} key {dotted!r} in {where}.{hint}{known}"
    if error["type"] == "missing":
        return f"{what} key {dotted!r} is missing in {where}; add it ({docs} lists every key)."
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{what} key {dotted!r} in {where}: {message}{shown}."


def _fields_at(schema: type[BaseModel], loc: list) -> list[str]:
    """Field names of the section at `loc`, found by walking the schema's annotations."""
    model: type[BaseModel] | None = schema
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        model = _model_in(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
