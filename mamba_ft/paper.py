"""`mamba-ft paper`: the fine-tuned ICL comparison of Halloran et al. as one command.

"Mamba State-Space Models Can Be Strong Downstream Learners" (arXiv 2406.00209) claims that
pretrained Mamba gets ~38% of a comparable Transformer's few-shot gain, ~81.5% once both are
fine-tuned the same way with mixed precision and adapters (MPFT+PEFT), and that MPFT+PEFT runs
faster and in less memory per token than an fp32 full fine-tune. For a Mamba and a Transformer
of the same size this module

1. fine-tunes each with one recipe (adapters on `all_linear`, autocast in `precision`) through
   the training loop, once per training seed (adapter init and data order, the same for both
   models); for the first training seed also the same model, data and steps as an fp32 full
   fine-tune (the cost baseline) and, unless `precision` is fp32, as fp32 with the same
   adapters (the drift baseline); every run in out/training-seed-<N>/runs/<model>-<run>/;
2. ICL-sweeps the base models (out/icl-before/) and, per training seed, the tuned ones, each
   evaluated as its base plus the adapter directory that seed's run saved
   (out/training-seed-<N>/icl-after/); each sweep divides the Mamba's gain by the
   Transformer's, with the sweep's intervals, and `over_training_seeds` combines the tuned
   sweeps: the mean gains, their ratio, and intervals that hold the spread between training
   seeds (Student-t) and the evaluation's own noise;
3. reads the first training seed's runs' tokens/s and peak memory from their metrics.jsonl;
4. measures how far the adapters tuned in `precision` and in fp32 (first training seed) make
   the model's outputs drift apart (`evaluation.stability.model_drift`), beside the two runs'
   eval losses;

and writes results.json and results.md (`evaluation/paper_report.py`) into `out`.

It lives beside `generation.py`, above `training/` and `evaluation/`: it runs the training loop,
and the training loop already imports the evaluation package (its hooks), so a module inside
`evaluation/` could not import the loop without an import cycle (tests/test_layout.py).

The default data are instruction-style rows generated from the rule corpus
(`rules.instruction_rows`, seed `data_seed`) into out/data/, once: every training seed trains
on the same rows. Any alpaca-format source (a file, a `datasets` directory, a hub name) can
replace them.
"""

from __future__ import annotations

import gc
import json
import math
import random
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mamba_ft.errors import UserError

PRECISIONS = ("bf16", "fp16", "fp32")
MODELS = ("mamba", "transformer")
# Rows of the generated instruction data (rules.instruction_rows): train and held-out eval.
GENERATED_ROWS = {"train": 512, "eval": 64}
# Training seeds go to accelerate's set_seed, whose NumPy seeding takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


@dataclass
class PaperSettings:
    mamba: str = "bundled:tiny-mamba"
    transformer: str = "bundled:tiny-gpt-neox"
    data: str | None = None  # alpaca-format train source; None: the generated rule instructions
    eval_data: str | None = None  # alpaca-format eval source (with the generated data: its eval split)
    tasks: str = "mamba_ft_icl"
    steps: int = 60
    shots: tuple[int, ...] = (0, 1, 3, 5)
    seeds: tuple[int, ...] = (1234, 1235, 1236)
    limit: int | float | None = None
    precision: str = "bf16"
    lr: float = 1e-3
    micro_batch_size: int = 8
    max_length: int = 256
    rank: int = 8
    # Seeds of the fine-tunes (adapter init, data order): each fine-tunes both models once.
    training_seeds: tuple[int, ...] = (0,)
    data_seed: int = 0  # of the generated instruction rows (unused with `data`)
    eval_batch_size: int = 8
    drift_rows: int = 4
    drift_length: int = 128
    online: bool = False


def run_paper(settings: PaperSettings, out: str | Path, *, overwrite: bool = False, log=print) -> dict:
    """Train, sweep, measure and write the report (module docstring); returns results.json's dict.

    Per-seed entries of results.json are keyed by the training seed as text ("0", "1", ...).
    """
    out = Path(out)
    _check(settings, out, overwrite)
    data = _data_sources(settings, out)
    seeds = list(settings.training_seeds)
    first = seeds[0]  # the seed whose runs also carry the cost and drift baselines
    # Every recipe is validated before the first run trains.
    recipes = {seed: {(model, run): _recipe(settings, model, run, seed, data, out, overwrite)
                      for model in MODELS for run in _run_names(settings.precision, baselines=seed == first)}
               for seed in seeds}
    for seed in seeds:
        for (model, run), recipe in recipes[seed].items():
            log(f"training {model} ({run}, training seed {seed}) -> {recipe.run.output_dir}")
            _train(recipe)
    trained = {str(seed): {model: {run: _run_record(recipes[seed][(model, run)])
                                   for run in _run_names(settings.precision, baselines=seed == first)}
                           for model in MODELS}
               for seed in seeds}
    peft = _run_names(settings.precision)[0]
    icl = {"before": _sweep(settings, out / "icl-before", "base", None, overwrite, log)}
    icl["after"] = {
        str(seed): _sweep(settings, seed_dir(out, seed) / "icl-after", "tuned",
                          {model: trained[str(seed)][model][peft]["adapter"] for model in MODELS},
                          overwrite, log, f" of training seed {seed}")
        for seed in seeds}
    icl["over_training_seeds"] = over_training_seeds([icl["after"][str(seed)] for seed in seeds], seeds)
    baseline_runs = trained[str(first)]
    results = {
        "settings": asdict(settings),
        "sources": {"mamba": settings.mamba, "transformer": settings.transformer},
        "data": {split: str(path) for split, path in data.items()},
        "training_seeds": seeds,
        "runs": trained,
        "icl": icl,
        # Cost and drift need no repeat per seed: they are measured on the first seed's runs.
        "costs_and_drift_training_seed": first,
        "costs": {model: costs(baseline_runs[model][peft]["metrics"], baseline_runs[model]["full-fp32"]["metrics"])
                  for model in MODELS},
        # With --precision fp32 the tuned run is the fp32 one: nothing to drift from.
        "drift": ({model: _drift(settings, getattr(settings, model), baseline_runs[model]) for model in MODELS}
                  if settings.precision != "fp32" else None),
    }
    from mamba_ft.evaluation.paper_report import markdown

    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    log(f"written to {out}/results.json and results.md")
    return results


def seed_dir(out: Path, seed: int) -> Path:
    """Where one training seed's runs and tuned sweep go."""
    return out / f"training-seed-{seed}"


def _run_names(precision: str, baselines: bool = True) -> list[str]:
    """The runs of each model: MPFT+PEFT first; with `baselines`, the fp32 full fine-tune (cost)
    and the fp32 PEFT twin (drift)."""
    peft = f"peft-{precision}"
    if not baselines:
        return [peft]
    return [peft, "full-fp32"] + (["peft-fp32"] if precision != "fp32" else [])


def _check(settings: PaperSettings, out: Path, overwrite: bool) -> None:
    """Every option, before anything is trained (a typo must not cost a training run)."""
    from mamba_ft.evaluation.sweep import check_shots_seeds

    if settings.precision not in PRECISIONS:
        raise UserError(f"--precision {settings.precision!r} is not one of {', '.join(PRECISIONS)}.")
    if settings.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA GPU (its loss scaling runs there); use "
                        "--precision bf16 on this machine.")
    for name, option in (("steps", "--steps"), ("micro_batch_size", "--micro-batch-size"),
                         ("max_length", "--max-length"), ("rank", "--rank"),
                         ("eval_batch_size", "--batch-size")):
        if getattr(settings, name) < 1:
            raise UserError(f"{option} {getattr(settings, name)} must be at least 1.")
    if not settings.lr > 0:
        raise UserError(f"--lr {settings.lr} must be positive.")
    if settings.limit is not None and settings.limit <= 0:
        raise UserError(f"--limit {settings.limit} must be positive: a count of documents, or a "
                        f"fraction below 1.")
    check_shots_seeds(settings.shots, settings.seeds)
    check_training_seeds(settings.training_seeds)
    if isinstance(settings.data_seed, bool) or not isinstance(settings.data_seed, int) or settings.data_seed < 0:
        raise UserError(f"--data-seed {settings.data_seed!r} must be a whole number >= 0.")
    if settings.data is None and settings.eval_data is not None:
        raise UserError("--eval-data goes with --data; the generated data bring their own eval split.")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the results.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; choose a new directory or pass --overwrite to "
                        f"replace the results there.")
    _check_tasks(settings)
    from mamba_ft.data import resolve_data_path
    from mamba_ft.evaluation.sweep import ModelSpec, check_sources

    check_sources([ModelSpec(model, source=getattr(settings, model)) for model in MODELS], settings.online)
    for path in (settings.data, settings.eval_data):
        if path is not None:
            resolve_data_path(path)


def _check_tasks(settings: PaperSettings) -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("mamba-ft paper's ICL sweeps need lm-eval; install it with "
                        "`pip install 'mamba-ft[eval]'`.") from None
    from mamba_ft.evaluation.tasks import offline_hub, parse_task_list, resolve_tasks, task_manager

    names = parse_task_list(settings.tasks)
    with offline_hub(enabled=not settings.online):
        resolve_tasks(names, task_manager(names))


def _data_sources(settings: PaperSettings, out: Path) -> dict[str, str]:
    """{"train": source, "eval": source or absent}: the given ones, or generated into out/data/."""
    if settings.data is not None:
        return {"train": settings.data, **({"eval": settings.eval_data} if settings.eval_data else {})}
    from mamba_ft.rules import instruction_rows

    directory = out / "data"
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.data_seed)
    sources = {}
    for split, n in GENERATED_ROWS.items():
        path = directory / f"rule-instructions-{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in instruction_rows(rng, n)))
        sources[split] = str(path.resolve())
    return sources


def _recipe(settings: PaperSettings, model: str, run: str, seed: int, data: dict[str, str], out: Path,
            overwrite: bool):
    """The one recipe, for `model` and training seed `seed`; `run` says whether it has adapters
    and which precision."""
    from mamba_ft.recipe import validate_recipe

    peft, precision = run.split("-")
    recipe = {
        "model": {"source": getattr(settings, model), "kind": model},
        "adapter": {"targets": ["all_linear"], "rank": settings.rank, "alpha": 2 * settings.rank}
        if peft == "peft" else None,
        "precision": {"mode": precision},
        "data": {"format": "alpaca", "train": {"path": data["train"]},
                 "eval": {"path": data["eval"]} if "eval" in data else None,
                 "max_length": settings.max_length},
        "optim": {"lr": settings.lr},
        "schedule": {"kind": "cosine", "warmup_steps": min(10, settings.steps // 10)},
        "run": {"output_dir": str(seed_dir(out, seed) / "runs" / f"{model}-{run}"), "max_steps": settings.steps,
                "micro_batch_size": settings.micro_batch_size, "seed": seed,
                "overwrite": overwrite},
        "logging": {"progress_bar": False, "plot": False},
    }
    return validate_recipe(recipe, where=f"the {model} {run} recipe of training seed {seed}")


def _train(recipe) -> None:
    from mamba_ft.training.loop import train

    _reset_peak_memory()
    train(recipe)


def _reset_peak_memory() -> None:
    """Start the peak that the loop records (metrics.jsonl's peak_memory_mb) afresh, so each
    run's peak is its own and not an earlier run's in this process: CUDA's allocator peak, or
    on a CPU the process's peak resident set (Linux resets it through /proc/self/clear_refs)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the recorded peak is the process's so far
        pass


def _run_record(recipe) -> dict:
    out = Path(recipe.run.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    return {"dir": str(out), "adapter": str(out / "adapter") if recipe.adapter is not None else None,
            "metrics": str(out / "metrics.jsonl"), "precision": recipe.precision.mode,
            "eval_loss_before": evals[0] if evals else None, "eval_loss_after": evals[-1] if evals else None}


def costs(peft_metrics: str | Path, full_metrics: str | Path) -> dict:
    """Throughput and peak memory of the MPFT+PEFT run against the fp32 full fine-tune, from
    their metrics.jsonl rows.

    tokens/s is the median over the logged steps after the first (the first pays for one-time
    allocations; with one step it is all there is); peak memory is the largest recorded. Both
    runs train on the same batches (same data, seed and steps), so the ratio of their peaks is
    also the ratio of their memory per token.
    """
    rows = {name: _step_rows(path) for name, path in (("peft", peft_metrics), ("full", full_metrics))}
    summary = {}
    for name, steps in rows.items():
        timed = steps[1:] or steps
        summary[name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                         "peak_memory_mb": max(r["peak_memory_mb"] for r in steps),
                         "steps_timed": len(timed)}
    summary["speedup"] = summary["peft"]["tokens_per_s"] / summary["full"]["tokens_per_s"]
    summary["memory_per_token_saving"] = 1 - summary["peft"]["peak_memory_mb"] / summary["full"]["peak_memory_mb"]
    summary["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return summary


def _step_rows(path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [row for row in rows if "tokens_per_s" in row]


def _sweep(settings: PaperSettings, directory: Path, suffix: str, adapters: dict[str, str] | None,
           overwrite: bool, log, which: str = "") -> dict:
    """One ICL sweep of the two models (base, or tuned with `adapters`), Mamba over Transformer."""
    from mamba_ft.evaluation.sweep import ModelSpec, run_icl_sweep
    from mamba_ft.precision import PrecisionPolicy

    labels = {model: f"{model}-{suffix}" for model in MODELS}
    specs = [ModelSpec(labels[model], source=getattr(settings, model),
                       adapter=adapters[model] if adapters else None) for model in MODELS]
    log(f"ICL sweep of the {suffix} models{which}")
    sweep = run_icl_sweep(specs, tasks=settings.tasks, shots=settings.shots, seeds=settings.seeds,
                          limit=settings.limit, out_dir=directory,
                          baseline=labels["transformer"], batch_size=settings.eval_batch_size,
                          online=settings.online, overwrite=overwrite, log=log,
                          **PrecisionPolicy(mode=settings.precision).evaluation_settings())
    # "adapter" is what the sweep loaded (its own results.json says the same).
    return {
        "dir": str(directory),
        "models": {model: {"label": labels[model], **sweep.models[labels[model]],
                           "gain": sweep.gains[labels[model]]} for model in MODELS},
        "ratio": sweep.ratios[labels["mamba"]],
    }


def over_training_seeds(sweeps: list[dict], seeds: list[int]) -> dict:
    """The tuned sweeps of every training seed combined: mean gains, their ratio, 95% intervals.

    Per model, the training seeds' gains g_1..g_S (each the mean over few-shot seeds that its
    sweep reports, with that sweep's standard error se_s: documents and few-shot draws):
    - `ci_seeds`: the Student-t interval over training seeds, mean ± t(S−1)·sd/√S
      (`synthetic.stats.seed_interval`, as `training.seeds` of `mamba-ft synth`). It holds the
      spread between fine-tunes, and the part of the evaluation noise that differs between
      them; given the evaluation's documents and few-shot draws, which all seeds share;
    - `ci`: that half-width and the evaluation's, z·mean(se_s), added in quadrature. The
      evaluation's is counted as if fully shared by the seeds: mean(se_s) bounds the standard
      error of the mean evaluation error whatever its correlation between seeds, so the
      interval also holds the documents and few-shot draws, conservatively.
    The ratio is mean Mamba gain / mean Transformer gain. Its intervals are Fieller's sets
    (`evaluation.intervals.fieller_set`) for the same two parts: over seeds, the per-seed pairs'
    sample covariance (both models are trained with each seed: a paired design) with t(S−1);
    the evaluation's part as in the sweep (models independent, z). A ratio whose Transformer
    gain interval contains 0 is unbounded (ci None, ci_unbounded true). With one training seed
    there is no seed spread: `ci` is then that seed's own sweep interval and `ci_seeds` None.
    """
    from mamba_ft.evaluation.intervals import LEVEL, Z, fieller_set
    from mamba_ft.synthetic.stats import seed_interval, t_quantile

    n = len(seeds)
    t = t_quantile(0.5 + LEVEL / 2, n - 1) if n > 1 else None
    models, parts = {}, {}
    for model in MODELS:
        values = [sweep["models"][model]["gain"]["mean"] for sweep in sweeps]
        errors = [sweep["models"][model]["gain"]["se"] for sweep in sweeps]
        mean, seed_half = seed_interval(values)
        se_within = statistics.fmean(errors) if None not in errors else None
        within_half = None if se_within is None else Z * se_within
        known = [h for h in (seed_half, within_half) if h is not None]
        half = math.sqrt(sum(h * h for h in known)) if known else None
        models[model] = {
            "per_seed": values, "mean": mean, "sd": statistics.stdev(values) if n > 1 else None,
            "seed_half_width": seed_half,
            "ci_seeds": None if seed_half is None else [mean - seed_half, mean + seed_half],
            "se_within": se_within, "within_half_width": within_half, "half_width": half,
            "ci": None if half is None else [mean - half, mean + half],
        }
        parts[model] = (values, within_half)
    (m_values, m_within), (t_values, t_within) = parts["mamba"], parts["transformer"]
    num, den = models["mamba"]["mean"], models["transformer"]["mean"]
    seed_form = within_form = None
    if n > 1:  # t²·(sample covariance matrix)/S of the two seed-mean gains
        seed_form = [t * t * v / n for v in (statistics.variance(m_values),
                                             statistics.covariance(m_values, t_values),
                                             statistics.variance(t_values))]
    if m_within is not None and t_within is not None:
        within_form = [m_within ** 2, 0.0, t_within ** 2]
    forms = [f for f in (seed_form, within_form) if f is not None]
    total = [sum(f[i] for f in forms) for i in range(3)] if forms else None
    ci_seeds = fieller_set(num, den, *seed_form) if seed_form else None
    ci = fieller_set(num, den, *total) if total else None
    ratio = {
        "ratio": num / den if den else None,
        "per_seed": [sweep["ratio"]["ratio"] for sweep in sweeps],
        "ci_seeds": list(ci_seeds) if ci_seeds is not None else None,
        "ci_seeds_unbounded": seed_form is not None and ci_seeds is None,
        "ci": list(ci) if ci is not None else None,
        "ci_unbounded": total is not None and ci is None,
    }
    return {"training_seeds": list(seeds), "level": LEVEL, "t_quantile": t, "z": Z,
            "models": models, "ratio": ratio}


def _drift(settings: PaperSettings, source: str, runs: dict) -> dict:
    """The adapter tuned in `precision` against the one tuned in fp32 (same recipe, training seed
    and batches), both on the base model in fp32, on held-out rule-corpus text; beside them the
    base model against the fp32 adapter, the change fine-tuning itself made, for scale."""
    from mamba_ft.adapters import load_adapters
    from mamba_ft.evaluation.stability import model_drift
    from mamba_ft.evaluation.stability_report import default_text, token_rows
    from mamba_ft.models import load_model

    low_run = _run_names(settings.precision)[0]
    models = {}
    for name in ("base", "peft-fp32", low_run):
        loaded = load_model(source, allow_transformers=True)
        if name != "base":
            load_adapters(loaded.model, runs[name]["adapter"])
        models[name] = loaded.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = token_rows(loaded.tokenizer, default_text(), settings.drift_rows, settings.drift_length).to(device)
    for model in models.values():
        model.to(device)
    drift = model_drift(models["peft-fp32"], models[low_run], ids)
    tuning = model_drift(models["base"], models["peft-fp32"], ids)
    return {"reference": "peft-fp32", "other": low_run,
            **drift.summary(), "kl": drift.kl, "logit_rel_error": drift.logit_rel_error,
            "fine_tuning_change": tuning.summary(),
            "eval_loss": {name: runs[name]["eval_loss_after"] for name in ("peft-fp32", low_run)}}


def main_from_cli(args) -> dict:
    """The `mamba-ft paper` command (arguments parsed in mamba_ft.cli, as text)."""
    from mamba_ft.evaluation.sweep import parse_int_list, parse_limit

    if args.seed is not None:
        raise UserError("--seed was replaced by --training-seeds (a comma-separated list: each seed "
                        "fine-tunes both models once, e.g. --training-seeds 0,1,2) and --data-seed "
                        "(the generated instruction data); the old --seed N is --training-seeds N "
                        "--data-seed N.")
    if args.out is None:
        raise UserError("--out is required: the directory for results.json, results.md, the runs and sweeps.")
    if args.data is not None and args.data_seed is not None:
        raise UserError("--data-seed goes with the generated data; --data brings its own rows.")
    settings = PaperSettings(
        mamba=args.mamba, transformer=args.transformer, data=args.data, eval_data=args.eval_data,
        tasks=args.tasks, steps=_number(args.steps, "--steps", int),
        shots=tuple(parse_int_list(args.shots, "--shots")), seeds=tuple(parse_int_list(args.seeds, "--seeds")),
        limit=None if args.limit is None else parse_limit(_number(args.limit, "--limit", float)),
        precision=args.precision, lr=_number(args.lr, "--lr", float),
        micro_batch_size=_number(args.micro_batch_size, "--micro-batch-size", int),
        max_length=_number(args.max_length, "--max-length", int), rank=_number(args.rank, "--rank", int),
        training_seeds=parse_training_seeds(args.training_seeds),
        data_seed=0 if args.data_seed is None else _number(args.data_seed, "--data-seed", int),
        eval_batch_size=_number(args.batch_size, "--batch-size", int), online=args.online)
    results = run_paper(settings, args.out, overwrite=args.overwrite,
                        log=lambda line: print(line, file=sys.stderr))
    from mamba_ft.evaluation.paper_report import summary

    print(summary(results), end="")
    return results


def parse_training_seeds(text: str) -> tuple[int, ...]:
    """--training-seeds' text as integers (the rest is `check_training_seeds`'s)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        return tuple(int(part) for part in parts if part)
    except ValueError:
        raise UserError(f"--training-seeds {text!r} must be comma-separated whole numbers, e.g. "
                        f"--training-seeds 0,1,2.") from None


def check_training_seeds(seeds) -> None:
    """At least one, each a whole number in set_seed's range, none twice."""
    seeds = list(seeds)
    if not seeds:
        raise UserError("--training-seeds lists no seed; give one or more, e.g. --training-seeds 0,1,2 "
                        "(3 or more for an interval over fine-tunes).")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise UserError(f"--training-seeds: {seed!r} is not a seed; seeds are whole numbers from "
                            f"0 to {MAX_SEED}.")
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise UserError(f"--training-seeds {','.join(map(str, seeds))} repeats "
                        f"{', '.join(map(str, repeated))}; a seed fine-tunes the same way every time, "
                        f"so give distinct seeds (e.g. 0,1,2).")


def _number(text: str, option: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"{option} {text!r} must be {what}.") from None
