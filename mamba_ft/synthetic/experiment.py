"""`mamba-ft synth`: train Mambas and size-matched Transformers from scratch on synthetic tasks,
and write results.json, results.md and plots.

`mamba-ft synth TARGET... [--set key=value] [--out DIR]`: each target is a recipe file
(recipes/synthetic/*.yaml) or a task name with its CPU-sized defaults. One target writes into
DIR; several write DIR/<name>/ each plus DIR/summary.md. Everything heavy (torch, datasets,
training) is imported only when a run starts, so building the CLI parser stays cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from mamba_ft.errors import UserError
from mamba_ft.synthetic.tasks import task_names


def run_synth(targets: list[str], out: str | Path, overrides: list[str] | None = None,
              overwrite: bool = False, resume: bool = False, jobs: int = 1) -> list[dict]:
    """Run each target (recipe file or task name) into `out` (or out/<name> for several)."""
    from mamba_ft.synthetic import report
    from mamba_ft.synthetic.spec import load_spec

    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; pass one of them.")
    if jobs < 1:
        raise UserError(f"--jobs {jobs} is out of range; use 1 or more.")
    specs = [(_name_of(t), load_spec(t, overrides)) for t in targets]  # validate all before any run
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"Two targets share the name {max(names, key=names.count)!r}; rename one file.")
    out = Path(out)
    dirs = [out] if len(specs) == 1 else [out / n for n in names]
    previous = [_previous_results(d, spec, overwrite, resume) for (_, spec), d in zip(specs, dirs)]

    if jobs > 1 and len(specs) > 1:
        flag = "--resume" if resume else "--overwrite" if overwrite else None
        _run_in_subprocesses(targets, dirs, overrides, flag, jobs)
        all_results = [json.loads((d / "results.json").read_text()) for d in dirs]
    else:
        from mamba_ft.synthetic.runner import run_spec

        all_results = []
        for (name, spec), d, prev in zip(specs, dirs, previous):
            d.mkdir(parents=True, exist_ok=True)

            def save(results, d=d):
                (d / "results.json").write_text(json.dumps(results, indent=1))
                report.write_report(results, d)

            results = run_spec(spec, d, name, previous=prev, save=save)
            save(results)
            all_results.append(results)
            print(f"[synth] {name}: wrote {d}/results.json, results.md and plots", flush=True)
    if len(specs) > 1:
        (out / "summary.md").write_text(report.summary_markdown(all_results))
        print(f"[synth] wrote {out}/summary.md", flush=True)
    return all_results


def _previous_results(directory: Path, spec, overwrite: bool, resume: bool) -> dict | None:
    """The results already in `directory` to continue from (--resume), or None to start afresh."""
    path = directory / "results.json"
    if not path.exists() or overwrite:
        return None
    if not resume:
        raise UserError(f"{path} already exists; choose another --out, pass --resume to continue "
                        f"that run, or --overwrite to replace it.")
    previous = json.loads(path.read_text())
    try:  # validated again, so a key added since (with its default) does not count as a change
        earlier = type(spec).model_validate(previous.get("spec", {})).model_dump(mode="json")
    except ValidationError:
        earlier = None
    if earlier != spec.model_dump(mode="json"):
        raise UserError(f"{path} holds a run of different settings; --resume continues only the "
                        f"same recipe and overrides (or pass --overwrite, or another --out).")
    return previous


def _run_in_subprocesses(targets, dirs, overrides, flag: str | None, jobs: int) -> None:
    """One `mamba-ft synth` process per target, `jobs` at a time, spread over the visible GPUs.

    A tiny model's training step is bound by kernel launches on the CPU and leaves the GPU mostly
    idle, so several processes sharing one GPU should overlap.
    """
    import torch

    gpus = torch.cuda.device_count()
    queue = list(zip(targets, dirs))
    running: list[tuple[subprocess.Popen, Path]] = []
    failed, launched = [], 0
    while queue or running:
        while queue and len(running) < jobs:
            target, d = queue.pop(0)
            d.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "mamba_ft.cli", "synth", target, "--out", str(d)]
            cmd += [f"--set={o}" for o in overrides or []]
            cmd += [flag] if flag else []
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(launched % gpus)
            launched += 1
            with open(d / "log.txt", "a") as log:  # the child keeps its own copy of the handle
                running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), d))
            print(f"[synth] started {target} -> {d} (log: {d / 'log.txt'})", flush=True)
        for proc, d in list(running):
            if proc.poll() is not None:
                running.remove((proc, d))
                print(f"[synth] finished {d} (exit {proc.returncode})", flush=True)
                if proc.returncode != 0:
                    failed.append(d)
        if running:
            time.sleep(1.0)
    if failed:
        raise UserError(f"{len(failed)} synthetic run(s) failed: {', '.join(map(str, failed))}; see log.txt "
                        f"there, then rerun the same command with --resume to finish them.")


def _name_of(target: str) -> str:
    return Path(target).stem if target.endswith((".yaml", ".yml")) else target


def add_synth_arguments(parser) -> None:
    parser.add_argument("targets", nargs="+", metavar="TASK_OR_RECIPE",
                        help=f"recipe file(s) under recipes/synthetic/, or a task: {', '.join(task_names())}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set training.steps=500 --set models.mamba.d_state=[8,32]")
    parser.add_argument("--out", default=None, help="output directory (default: runs/synth/<name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue runs already in --out: models with results are not retrained")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run up to N recipes at once, each in its own process (spread over visible GPUs)")


def run_synth_cli(args) -> None:
    out = args.out or (Path("runs/synth") / (_name_of(args.targets[0]) if len(args.targets) == 1 else "suite"))
    run_synth(args.targets, out, args.overrides, overwrite=args.overwrite, resume=args.resume,
              jobs=args.jobs)
