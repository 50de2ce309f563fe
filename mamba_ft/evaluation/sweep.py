"""The few-shot ICL sweep: models × tasks × shots × few-shot seeds, through lm-eval.

`run_icl_sweep` evaluates every model on every task at every shot count, once per few-shot
seed (0 shots has no examples to draw, so it runs once), and writes
- results.json: every score (model, task, shots, seed, metric, value), the derived gains and
  ratios, and what was run;
- results.md: per-task accuracy against shots (mean ± spread over seeds), gains and ratios;
- accuracy_vs_shots.png (one panel per task, plus their mean) and icl_gain.png.

ICL gain of a model = the mean, over tasks and over shot counts k > 0, of
(score at k shots − score at 0 shots), each task with its own metric (acc or acc_norm, as in
the Mamba papers). It is computed once per few-shot seed; the report gives its mean and
standard deviation over seeds. The ratio of a model to the baseline (by default the first
Transformer) is gain(model) / gain(baseline) from the seed-mean gains, with the range of the
per-seed ratios beside it. Halloran et al. report this ratio for Mamba against Transformers of
the same size: 38% pretrained, up to 81.5% after fine-tuning.

With `bootstrap_iters` > 0 lm-eval also returns each score's standard error over documents;
gains and ratios then get 95% intervals that hold both those and the spread over seeds
(`intervals.py`).
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamba_ft.errors import UserError
from mamba_ft.precision import PrecisionPolicy
from mamba_ft.evaluation.intervals import fieller_interval, linear_se, normal_interval
from mamba_ft.evaluation.result import SweepResult, sample_std
from mamba_ft.recipe import DEFAULT_BOOTSTRAP_ITERS, DEFAULT_SEEDS, DEFAULT_SHOTS, IclSweepConfig

OUTPUT_FILES = ("results.json", "results.md", "accuracy_vs_shots.png", "icl_gain.png")


@dataclass
class ModelSpec:
    """One model of a sweep.

    `source`: checkpoint directory, hub id, config file or `bundled:NAME`; or `model`: a model
    already in memory (a training loop's), with its `tokenizer` (object or path). `adapter`: a
    directory written by `mamba_ft.adapters.save_adapters`, attached after loading.
    """

    label: str
    source: str | None = None
    adapter: str | None = None
    tokenizer: Any = None
    model: Any = field(default=None, repr=False)


def run_icl_sweep(
    models: list[ModelSpec],
    tasks: str | list[str] = "mamba_ft_icl",
    shots: tuple[int, ...] | list[int] = DEFAULT_SHOTS,
    seeds: tuple[int, ...] | list[int] = DEFAULT_SEEDS,
    limit: int | float | None = None,
    out_dir: str | Path | None = None,
    *,
    baseline: str | None = None,
    batch_size: int | str = 8,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    device: str | None = None,
    dtype: str = "float32",
    autocast: str | None = None,
    local_data: dict[str, str | Path] | None = None,
    online: bool = False,
    overwrite: bool = False,
    log=print,
) -> SweepResult:
    """Run the sweep (module docstring); write the report into `out_dir` when given.

    In-memory models (ModelSpec.model) are evaluated where they are and put back into the
    training/eval mode they had. `dtype`: the dtype weights are loaded in; `autocast`
    ("bfloat16", "float16"): run the forwards under autocast, weights staying in `dtype`.
    `online=False` keeps the Hugging Face Hub off for datasets and models; `local_data` maps a
    task to a directory of its split files. `bootstrap_iters`: lm-eval's, for the scores'
    standard errors (0: none, and intervals from the spread over seeds alone).
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("The ICL sweep needs lm-eval; install it with `pip install 'mamba-ft[eval]'`.") from None
    from mamba_ft.evaluation.tasks import load_tasks, offline_hub, parse_task_list, resolve_tasks, task_manager

    shots, seeds = check_shots_seeds(shots, seeds)
    if isinstance(bootstrap_iters, bool) or not isinstance(bootstrap_iters, int) or bootstrap_iters < 0:
        raise UserError(f"bootstrap_iters {bootstrap_iters!r} must be a whole number >= 0 (0 turns "
                        f"lm-eval's standard errors off; default {DEFAULT_BOOTSTRAP_ITERS}).")
    _check_device(device)
    models = _check_models(models, baseline)
    out = _check_out_dir(out_dir, overwrite)
    names = parse_task_list(tasks)
    with offline_hub(enabled=not online), _quiet_lm_eval():
        manager = task_manager(names)
        specs = resolve_tasks(names, manager, local_data)
        check_sources(models, online)
        loaded_tasks = load_tasks(specs, manager)
        task_metrics = {name: metric for name, (_, metric) in loaded_tasks.items()}
        scores: list[dict] = []
        infos: dict[str, dict] = {}
        for spec in models:
            infos[spec.label] = _evaluate_model(spec, loaded_tasks, manager, shots, seeds, limit,
                                                bootstrap_iters,
                                                dict(batch_size=batch_size, device=device, dtype=dtype,
                                                     mixed_precision_dtype=autocast),
                                                scores, log)
    if baseline is None:  # the first Transformer, now that we know which models are Mamba
        baseline = next((label for label, info in infos.items() if not info["is_mamba"]), None)
    result = SweepResult(models=infos, tasks=task_metrics, shots=shots, seeds=seeds, limit=limit,
                         baseline=baseline, scores=scores, bootstrap_iters=bootstrap_iters)
    _add_gains(result)
    if out is not None:
        from mamba_ft.evaluation.report import write_report

        result.out_dir = str(out)
        write_report(result, out)
        log(f"ICL sweep written to {out}/ ({', '.join(OUTPUT_FILES)})")
    return result


def check_shots_seeds(shots, seeds) -> tuple[list[int], list[int]]:
    shots = sorted(dict.fromkeys(int(k) for k in shots))
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if shots and shots[0] < 0:
        raise UserError(f"Shot counts cannot be negative: {shots}.")
    if not shots or shots[0] != 0 or len(shots) < 2:
        raise UserError(f"Shots {shots} must include 0 and at least one k > 0: the ICL gain is "
                        f"the score at k shots minus the score at 0 shots (e.g. --shots 0,1,3,5).")
    if not seeds:
        raise UserError("Give at least one few-shot seed (e.g. --seeds 1234,1235,1236).")
    return shots, seeds


def _check_device(device: str | None) -> None:
    import torch

    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"Device {device!r} was asked for but CUDA is not available here; use "
                        f"--device cpu (or leave --device out).")


def _check_models(models: list[ModelSpec], baseline: str | None) -> list[ModelSpec]:
    if not models:
        raise UserError("No models given; name at least one with --model LABEL=PATH.")
    labels = [m.label for m in models]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"Model label {duplicates[0]!r} is used twice; give each model its own "
                        f"label (--model LABEL=PATH).")
    for spec in models:
        if spec.model is None and not spec.source:
            raise UserError(f"Model {spec.label!r} has neither a path nor an in-memory model.")
    if baseline is not None and baseline not in labels:
        from mamba_ft.errors import did_you_mean

        raise UserError(f"The baseline {baseline!r} is not one of the models "
                        f"({', '.join(labels)}).{did_you_mean(baseline, labels)}")
    return models


def check_sources(models: list[ModelSpec], online: bool) -> None:
    # Fail on a wrong path before any model is loaded or evaluated.
    from huggingface_hub import try_to_load_from_cache

    from mamba_ft.models import resolve_source

    for spec in models:
        if spec.model is None:
            source = resolve_source(spec.source)
            if isinstance(source, str) and not online and not isinstance(try_to_load_from_cache(source, "config.json"), str):
                raise UserError(f"Model {spec.label!r}: {source!r} is neither a local path nor a "
                                f"Hugging Face model in the local cache (mamba-ft evaluates offline); "
                                f"give an existing checkpoint directory, or pass --online to download it.")
        if spec.adapter is not None and not Path(spec.adapter).is_dir():
            raise UserError(f"The adapter directory {spec.adapter!r} of model {spec.label!r} does "
                            f"not exist; give the directory the training run saved its adapter to.")


def _check_out_dir(out_dir, overwrite: bool) -> Path | None:
    if out_dir is None:
        return None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"The output path {out} is a file; give a directory for the sweep's results.")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds a sweep ({', '.join(existing)}); choose another "
                        f"--out directory or pass --overwrite to replace those files.")
    return out


class _quiet_lm_eval:
    """lm-eval logs every few-shot override and task load at INFO/WARNING; keep errors only."""

    def __enter__(self):
        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _evaluate_model(spec: ModelSpec, loaded_tasks, manager, shots, seeds, limit, bootstrap_iters: int,
                    lm_options: dict, scores: list[dict], log) -> dict:
    import torch
    from lm_eval.evaluator import evaluate

    from mamba_ft.evaluation.lm_eval_model import MambaFTLM

    in_memory = spec.model is not None
    was_training = bool(getattr(spec.model, "training", False))
    lm = MambaFTLM(pretrained=spec.model if in_memory else spec.source, adapter=spec.adapter,
                   tokenizer=spec.tokenizer, show_progress=False, **lm_options)
    # What was loaded: an adapter directory given as the model itself is found by MambaFTLM.
    info = {"source": lm.source, "adapter": lm.adapter_dir, "is_mamba": lm.is_mamba}
    task_objects = [task for task, _ in loaded_tasks.values()]
    try:
        for k in shots:
            for seed in (seeds if k else seeds[:1]):
                start = time.perf_counter()
                # lm-eval's `evaluate` with the shot count and few-shot seed set on each task, as
                # `simple_evaluate` does it; the latter also gathers environment info through a
                # dozen subprocesses per call, seconds that a sweep of many calls can do without.
                for task in task_objects:
                    task.set_config(key="num_fewshot", value=k)
                    task.set_fewshot_seed(seed=seed)
                output = evaluate(lm=lm, task_dict=manager.load(task_objects), limit=limit,
                                  log_samples=False, bootstrap_iters=bootstrap_iters)
                for task, (_, metric) in loaded_tasks.items():
                    values = output["results"][task]
                    for name in dict.fromkeys((metric, "acc", "acc_norm")):
                        if f"{name},none" in values:
                            scores.append({"model": spec.label, "task": task, "shots": k,
                                           "seed": seed if k else None, "metric": name,
                                           "value": float(values[f"{name},none"]),
                                           "stderr": _stderr(values.get(f"{name}_stderr,none"))})
                log(f"  {spec.label}: {k}-shot" + (f", seed {seed}" if k else "")
                    + f" done in {time.perf_counter() - start:.1f}s")
    finally:
        if in_memory:
            spec.model.train(was_training)
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return info


def _stderr(value) -> float | None:
    # lm-eval writes "N/A" where it computed no standard error (bootstrap_iters 0, one document).
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _add_gains(result: SweepResult) -> None:
    positive = [k for k in result.shots if k > 0]
    for label in result.models:
        per_seed = {}
        for seed in result.seeds:
            diffs = [result.score(label, task, k, seed) - result.score(label, task, 0, None)
                     for task in result.tasks for k in positive]
            per_seed[seed] = statistics.fmean(diffs)
        values = list(per_seed.values())
        mean, std = statistics.fmean(values), sample_std(values)
        se_scores = _gain_se_scores(result, label, positive)
        # The seed-mean's standard error over few-shot draws; one seed cannot show that spread.
        se_seeds = std / math.sqrt(len(values)) if len(values) > 1 else None
        known = [se for se in (se_scores, se_seeds) if se is not None]
        se = math.sqrt(sum(x * x for x in known)) if known else None
        result.gains[label] = {"mean": mean, "std": std, "per_seed": per_seed, "se_scores": se_scores,
                               "se_seeds": se_seeds, "se": se,
                               "ci": list(normal_interval(mean, se)) if se is not None else None}
    if result.baseline is None:
        return
    base = result.gains[result.baseline]
    for label, gain in result.gains.items():
        if label == result.baseline:
            continue
        per_seed = {seed: (gain["per_seed"][seed] / base["per_seed"][seed]) if base["per_seed"][seed] else None
                    for seed in result.seeds}
        finite = [r for r in per_seed.values() if r is not None]
        ci = None
        if gain["se"] is not None and base["se"] is not None:
            ci = fieller_interval(gain["mean"], gain["se"], base["mean"], base["se"])
        result.ratios[label] = {
            "ratio": gain["mean"] / base["mean"] if base["mean"] else None,
            "per_seed": per_seed,
            "min": min(finite) if finite else None,
            "max": max(finite) if finite else None,
            "ci": list(ci) if ci is not None else None,
            "ci_unbounded": ci is None and gain["se"] is not None and base["se"] is not None,
        }


def _gain_se_scores(result: SweepResult, label: str, positive: list[int]) -> float | None:
    """The seed-mean gain's standard error from the scores' own (None unless all were recorded).

    The gain is Σ_{t,k,s} A(t,k,s) / (T·K·S) − Σ_t A(t,0) / T over T tasks, K shot counts > 0
    and S seeds, the 0-shot score shared by every k and seed.
    """
    weight = 1 / (len(result.tasks) * len(positive) * len(result.seeds))
    terms = [(weight, result.stderr(label, task, k, seed))
             for task in result.tasks for k in positive for seed in result.seeds]
    terms += [(-1 / len(result.tasks), result.stderr(label, task, 0, None)) for task in result.tasks]
    if any(se is None for _, se in terms):
        return None
    return linear_se(terms)


def run_after_training(config: IclSweepConfig, model, tokenizer, base_source: str | None,
                       out_dir: str | Path, precision: PrecisionPolicy | None = None,
                       log=print) -> SweepResult:
    """The sweep a training run ends with; writes into `out_dir` (replacing an earlier sweep there).

    `precision`: the run's policy, so every model is scored under the autocast it trained with.
    """
    models = [ModelSpec("fine-tuned", model=model, tokenizer=tokenizer)]
    if config.compare_base and base_source is not None:
        models.append(ModelSpec("base", source=str(base_source)))
    models += [ModelSpec(label, source=source) for label, source in config.baselines.items()]
    baseline = next(iter(config.baselines), "base" if len(models) > 1 else None)
    result = run_icl_sweep(models, tasks=config.tasks, shots=config.shots, seeds=config.seeds,
                           limit=config.limit, out_dir=out_dir, baseline=baseline,
                           batch_size=config.batch_size, bootstrap_iters=config.bootstrap_iters,
                           overwrite=True, log=log,
                           **(precision or PrecisionPolicy()).evaluation_settings())
    gain = result.gains["fine-tuned"]
    line = f"ICL gain of the fine-tuned model: {100 * gain['mean']:+.1f} ± {100 * gain['std']:.1f} points"
    ratio = result.ratios.get("fine-tuned", {}).get("ratio")
    log(line + (f", {100 * ratio:.0f}% of {baseline}'s" if ratio is not None else ""))
    return result


def parse_model_args(models: list[str], adapters: list[str] | None = None,
                     tokenizers: list[str] | None = None) -> list[ModelSpec]:
    """ModelSpecs from the command line's `[LABEL=]SOURCE`, `LABEL=ADAPTER_DIR`, `LABEL=TOKENIZER`."""
    specs = []
    for text in models:
        label, _, source = text.partition("=") if "=" in text else ("", "", text)
        label = label or Path(source.rstrip("/")).name.replace("bundled:", "") or source
        specs.append(ModelSpec(label=label, source=source))
    by_label = {spec.label: spec for spec in specs}
    for option, values, attr in (("--adapter", adapters, "adapter"), ("--tokenizer", tokenizers, "tokenizer")):
        for text in values or []:
            label, sep, path = text.partition("=")
            if not sep or label not in by_label:
                from mamba_ft.errors import did_you_mean

                raise UserError(f"{option} {text!r} must be LABEL=PATH with LABEL one of the models "
                                f"({', '.join(by_label)}).{did_you_mean(label, by_label)}")
            setattr(by_label[label], attr, path)
    return specs


def main_from_cli(args) -> SweepResult:
    """The `mamba-ft icl` command (arguments parsed in mamba_ft.cli)."""
    local_data = {}
    for text in args.data or []:
        task, sep, path = text.partition("=")
        if not sep:
            raise UserError(f"--data {text!r} must be TASK=DIR (a directory with the task's split files).")
        local_data[task] = path
    result = run_icl_sweep(
        parse_model_args(args.model, args.adapter, args.tokenizer),
        tasks=args.tasks,
        shots=parse_int_list(args.shots, "--shots"),
        seeds=parse_int_list(args.seeds, "--seeds"),
        limit=parse_limit(args.limit),
        out_dir=args.out,
        baseline=args.baseline,
        batch_size=int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size,
        bootstrap_iters=(DEFAULT_BOOTSTRAP_ITERS if args.bootstrap_iters is None
                         else args.bootstrap_iters),
        device=args.device,
        dtype=args.dtype,
        autocast=args.autocast,
        local_data=local_data,
        online=args.online,
        overwrite=args.overwrite,
        log=lambda line: print(line, file=sys.stderr),
    )
    from mamba_ft.evaluation.report import summary_table

    print(summary_table(result))
    return result


def parse_limit(value: float | None) -> int | float | None:
    # lm-eval reads a float below 1 as a fraction of the documents and anything else as a count.
    if value is None:
        return None
    if value <= 0:
        raise UserError(f"--limit {value} must be positive: a count of documents, or a fraction below 1.")
    return int(value) if value >= 1 else value


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r} must be comma-separated integers, e.g. 0,1,3,5.") from None
