"""One synthetic spec, run: generate the data, train every model of the sweep, score them.

For each task variant (e.g. direct vs CoT) the same seeded train set trains every model: each
Mamba (d_model x d_state, and the length-scaled ones) and, per Mamba width and Transformer
position encoding, one Transformer with the closest parameter count; each once per training
seed (`training.seeds`, default the recipe's `seed`). With `train_max_lengths`, each longest
training length L is a group of its own (its own train set on [train_lengths[0], L], its own
scaled d_state), scored on the same test sets as every other group. Training is
`mamba_ft.training.loop.train` with the datasets passed in; scoring is teacher-forced and
greedy at every test length. The result is the dict that results.json holds.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from mamba_ft.synthetic import data, predict, report, scoring
from mamba_ft.synthetic.base import Task
from mamba_ft.synthetic.plan import ModelPlan, plan_models
from mamba_ft.synthetic.spec import SynthSpec

N_VALID = 256  # in-distribution held-out examples for the trainer's eval loss


def _training_recipe(spec: SynthSpec, out_dir: Path, tag: str, seed: int):
    from mamba_ft.recipe import validate_recipe

    t = spec.training
    return validate_recipe({
        # The model and the data are passed to train() directly; these name where they came from.
        "model": {"source": f"synthetic:{tag}", "init_seed": seed},
        "data": {"train": {"path": f"synthetic:{tag}"}, "max_length": 1_000_000},
        "precision": {"mode": t.precision},
        "optim": {"lr": t.lr, "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
                  "betas": [0.9, 0.98]},
        "schedule": {"kind": t.schedule, "warmup_steps": t.warmup_steps},
        "run": {"output_dir": str(out_dir), "max_steps": t.steps, "micro_batch_size": t.batch_size,
                "seed": seed, "save_final": False, "overwrite": True, "eval_every": 0},
        "logging": {"every": max(1, t.steps // 10), "progress_bar": False, "plot": False},
    }, where=f"the training settings of {tag}")


def _fit(spec: SynthSpec, plan: ModelPlan, seed: int, model, tokenizer, train_ds, valid_ds, out_dir: Path) -> dict:
    from accelerate.utils import extract_model_from_parallel

    from mamba_ft.training.loop import train

    recipe = _training_recipe(spec, out_dir, plan.name, seed)
    start = time.perf_counter()
    result = train(recipe, model=model, tokenizer=tokenizer, train_dataset=train_ds, eval_dataset=valid_ds)
    seconds = time.perf_counter() - start
    # Mixed precision wraps forward in autocast; evaluation runs the plain fp32 model.
    extract_model_from_parallel(model, keep_fp32_wrapper=False)
    tail = result.step_losses[-max(1, len(result.step_losses) // 20):]
    summary = {"train_seconds": round(seconds, 2), "steps": result.steps,
               "first_train_loss": round(result.step_losses[0], 5),
               "final_train_loss": round(sum(tail) / len(tail), 5)}
    if result.final_eval_loss is not None:
        summary["initial_valid_loss"] = round(result.initial_eval_loss, 5)
        summary["final_valid_loss"] = round(result.final_eval_loss, 5)
    return summary


def group_label(spec: SynthSpec, label: str, max_length: int) -> str:
    """The variant label of one training range: the task variant's own, plus `train_max=L`
    when the spec sweeps the longest training length."""
    if spec.train_max_lengths is None:
        return label
    return f"train_max={max_length}" if label == spec.task else f"{label},train_max={max_length}"


def evaluate(model, task: Task, test_sets: dict[int, list], decoding: list[str], batch_size: int) -> list[dict]:
    rows = []
    model.eval()
    for length, examples in test_sets.items():
        row = {"length": length}
        bits = task.information_bits(length)
        if bits is not None:  # what the answer needs from the prompt (COPY)
            row["information_bits"] = round(bits, 3)
        for mode in decoding:
            fn = predict.teacher_forced if mode == "teacher_forced" else predict.greedy
            row[mode] = scoring.score(task, examples, fn(model, task.vocab, examples, batch_size))
        rows.append(row)
    return rows


def run_spec(spec: SynthSpec, out_dir: Path, name: str, device: str | None = None,
             previous: dict | None = None, save=None) -> dict:
    """Run the spec; models already in `previous` (an earlier results dict of the same spec)
    are kept, not retrained. `save(results)` is called after every model, so an interrupted
    run keeps what it finished."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Models this small gain nothing from intra-op threads, and on a busy machine OpenMP
        # threads waiting on each other made a training step ~20x slower (measured: 40 steps
        # of a 19k-parameter Transformer, 19.6 s with 2 threads, 0.9 s with 1).
        torch.set_num_threads(1)
    try:
        return _run_spec(spec, out_dir, name, device, previous, save or (lambda results: None))
    finally:
        torch.set_num_threads(threads)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"


def _run_spec(spec: SynthSpec, out_dir: Path, name: str, device: str, previous: dict | None, save) -> dict:
    started = time.perf_counter()
    earlier = previous["seconds"] if previous else 0.0
    results = {"name": name, "spec": spec.model_dump(mode="json"), "device": _device_name(device),
               "torch": torch.__version__, "seconds": earlier, "test_set_sizes": {},
               "runs": list(previous["runs"]) if previous else []}
    # Runs written before training seeds existed were trained with the recipe's seed.
    done = {(r["variant"], r["model"], r.get("seed", spec.seed)) for r in results["runs"]}
    seeds = spec.training_seeds()
    several = len(seeds) > 1  # then each run has its own train/ directory and log tag
    lo = spec.train_lengths[0]
    for task_label, task in spec.tasks():
        # One train set per training range; the test sets exclude the prompts of all of them (and
        # of their validation sets), so every range is scored on the same examples.
        train_sets = {hi: data.train_examples(task, lo, hi, spec.n_train, spec.seed) for hi in spec.max_lengths()}
        seen = set().union(*(data.prompts(ex) for ex in train_sets.values()))
        valid_sets = {hi: data.test_examples(task, hi, N_VALID, spec.seed + 1, seen) for hi in spec.max_lengths()}
        held_out = seen.union(*(data.prompts(ex) for ex in valid_sets.values()))
        test_sets = {n: data.test_examples(task, n, spec.n_test, spec.seed, held_out) for n in spec.test_lengths}
        longest = max(len(e.tokens) for ex in test_sets.values() for e in ex) + 8  # + generation slack
        tokenizer = task.vocab.hf_tokenizer()
        for hi in spec.max_lengths():
            label = group_label(spec, task_label, hi)
            results["test_set_sizes"][label] = {str(n): len(ex) for n, ex in test_sets.items()}
            jobs = [(p, seed) for p in plan_models(spec, task, longest, hi) for seed in seeds
                    if (label, p.name, seed) not in done]
            if not jobs:
                continue
            train_ds, valid_ds = data.to_dataset(task, train_sets[hi]), data.to_dataset(task, valid_sets[hi])
            for plan, seed in jobs:
                run = _train_and_score(spec, name, task, task_label, label, (lo, hi), plan, seed, several,
                                       tokenizer, train_ds, valid_ds, test_sets, out_dir, device)
                results["runs"].append(run)
                results["seconds"] = round(earlier + time.perf_counter() - started, 1)
                save(results)
                decoding, metric, metric_name = report.headline(results)
                shown = ", ".join(f"{r['length']}: {r[decoding][metric]:.2f}" for r in run["results"])
                print(f"[synth]   trained in {run['train_seconds']:.0f}s, scored in {run['eval_seconds']:.0f}s; "
                      f"{metric_name} by length: {shown}", flush=True)
    results["seconds"] = round(earlier + time.perf_counter() - started, 1)
    return results


def _train_and_score(spec: SynthSpec, name: str, task: Task, task_label: str, label: str,
                     train_lengths: tuple[int, int], plan: ModelPlan, seed: int, several: bool, tokenizer,
                     train_ds, valid_ds, test_sets: dict[int, list], out_dir: Path, device: str) -> dict:
    """Train one model with one seed on one training range and score it: its run's record."""
    from mamba_ft.models import load_model

    print(f"[synth] {name} / {label} / {plan.name}" + (f" / seed {seed}" if several else "")
          + f": {plan.params:,} parameters", flush=True)
    model = load_model(plan.config, need_tokenizer=False, allow_transformers=True, seed=seed).model
    train_dir = out_dir / "train" / label / plan.name
    if several:
        train_dir = train_dir / f"seed{seed}"
    fit = _fit(spec, plan, seed, model, tokenizer, train_ds, valid_ds, train_dir)
    model.to(device=device, dtype=torch.float32)
    t0 = time.perf_counter()
    scores = evaluate(model, task, test_sets, spec.decoding, spec.eval_batch_size)
    return {"variant": label, "task_variant": task_label, "train_lengths": list(train_lengths),
            "model": plan.name, "seed": seed, "family": plan.family, "params": plan.params,
            "d_model": plan.d_model, "d_state": plan.d_state, "state_floats": plan.state_floats,
            "d_state_per_length": plan.d_state_per_length, "position": plan.position,
            "device": _device_name(device), **fit, "eval_seconds": round(time.perf_counter() - t0, 2),
            "results": scores}
