"""Combine the parts of one synthetic recipe that were run as separate processes into the
results.json, results.md and plots the recipe would have written in one run.

`mamba-ft synth` trains a recipe's models one after another. mqar_gpu.yaml was instead run as
one process per (d_model, d_state) with `--set` overrides, so that the models train side by side
on the GPU; every part uses the recipe's seed and data, and a model's training does not depend on
which other models are in the sweep. This script checks that each part is the recipe with only
the sweep narrowed, then writes the parts' runs in the recipe's own model order (and, with
several training seeds, each seed's run), with each run's training log.

    python benchmarks/merge_synth_runs.py RECIPE OUT_DIR PART_DIR...

`seconds` becomes the longest part's wall time (they ran at the same time).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mamba_ft.synthetic import report
from mamba_ft.synthetic.plan import plan_models
from mamba_ft.synthetic.spec import load_spec


def merge(recipe: str, out: Path, parts: list[Path]) -> dict:
    spec = load_spec(recipe)
    full = spec.model_dump(mode="json")
    parts = [p for p in parts if (p / "results.json").exists()]  # a part with no finished model has none
    results = [json.loads((p / "results.json").read_text()) for p in parts]
    for part, r in zip(parts, results):
        narrowed = json.loads(json.dumps(r["spec"]))
        narrowed["models"] = full["models"]
        if narrowed != full:
            raise SystemExit(f"{part} is not {recipe} with only models narrowed")
        if r["test_set_sizes"] != results[0]["test_set_sizes"]:
            raise SystemExit(f"{part} was scored on other test sets")
    # A run is one (variant, model, training seed); results written before seeds existed
    # carry none and used the recipe's seed.
    def key(run):
        return run["variant"], run["model"], run.get("seed", spec.seed)

    runs = {key(run): run for r in results for run in r["runs"]}
    trained_in = {key(run): part for part, r in zip(parts, results) for run in r["runs"]}
    seeds = spec.training_seeds()
    order = []
    for label, task in spec.tasks():
        for plan in plan_models(spec, task, 1_000_000):
            order.extend((label, plan.name, seed) for seed in seeds)
    missing = [key for key in order if key not in runs]
    merged = {"name": Path(recipe).stem, "spec": full, "device": results[0]["device"],
              "torch": results[0]["torch"], "seconds": max(r["seconds"] for r in results),
              "test_set_sizes": results[0]["test_set_sizes"],
              "runs": [runs[key] for key in order if key in runs],
              "merged_from": [str(p) for p in parts], "missing": [list(k) for k in missing]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    report.write_report(merged, out)
    for (variant, model, seed), part in trained_in.items():  # the trainer's metrics.jsonl, recipe.yaml
        sub = Path(variant) / model / (f"seed{seed}" if len(seeds) > 1 else "")
        shutil.copytree(part / "train" / sub, out / "train" / sub, dirs_exist_ok=True)
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="the recipe the parts ran, e.g. recipes/synthetic/mqar_gpu.yaml")
    p.add_argument("out", type=Path, help="where the merged results go")
    p.add_argument("parts", type=Path, nargs="+", help="the parts' --out folders")
    args = p.parse_args()
    m = merge(args.recipe, args.out, args.parts)
    print(f"merged {len(m['runs'])} runs; missing: {m['missing'] or 'none'}")


if __name__ == "__main__":
    main()
