"""Helpers of the multi-process tests (tests/test_distributed*.py): launch, read results back.

Launches are real `accelerate launch` runs with the shipped configs, in a child process. The
worker (`python tests/distributed_runs.py RECIPE OVERRIDES... [--next RECIPE OVERRIDES...]`, run
under the launcher) trains like `mamba-ft train`, several recipes per launch (one start-up), and
records per process what the ops saw: the shapes of the weights the conv and the scan received
inside the forward, and the local shard shape of a parameter outside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from mamba_ft.training.distributed import run_launcher

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "accelerate"


def write_recipe(path: Path, out: Path, adapter: dict | None, *, lr: float = 1e-2, n_documents: int = 32,
                 precision: str = "fp32", source: str = "bundled:tiny-mamba", **run) -> Path:
    """A recipe on a bundled tiny model (4 blocks, d_model 96) and generated data."""
    recipe = {
        "model": {"source": source, "init_seed": 0, "kind": "auto"},
        "adapter": adapter,
        "precision": {"mode": precision},
        "data": {"train": {"icl_rules": {"n_documents": n_documents, "seed": 0, "min_demos": 1, "max_demos": 3}},
                 "eval": {"icl_rules": {"n_documents": 6, "seed": 1, "min_demos": 1, "max_demos": 3}},
                 "max_length": 48},
        "optim": {"lr": lr},
        "run": {"output_dir": str(out), "max_steps": 3, "micro_batch_size": 2, **run},
        "logging": {"progress_bar": False, "plot": False},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(config: str | None, recipe: Path, overrides: list[str] = (), *, worker: bool = False,
           num_processes: int | None = None, port: int | None = None, cpu: bool = True,
           timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/CONFIG` the CLI (or the worker).

    config None: no launcher, one process (`python -m mamba_ft.cli train`).
    """
    target = [str(Path(__file__).resolve())] if worker else ["-m", "mamba_ft.cli", "train"]
    if config is None:
        cmd = [sys.executable, *target, str(recipe), *overrides]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
        if num_processes is not None:
            cmd += ["--num_processes", str(num_processes)]
        if port is not None:
            cmd += ["--main_process_port", str(port)]
        cmd += [*target, str(recipe), *overrides]
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if cpu:
        child_env["CUDA_VISIBLE_DEVICES"] = ""
    return run_group(cmd, child_env, timeout)


def run_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher from the repository root; fail the test with its output unless it exits 0
    in time (on timeout its workers are stopped too)."""
    code, stdout, stderr, timed_out = run_launcher(cmd, env, timeout, cwd=REPO)
    what = f"timed out after {timeout:.0f} s" if timed_out else f"exit {code}"
    assert not timed_out and code == 0, f"{' '.join(cmd)}: {what}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


def step_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [r["loss"] for r in rows if "loss" in r]


def saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor the run saved at the end: the adapter files, or the model's."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted((out / "adapter").glob("*.safetensors")) or sorted((out / "model").glob("*.safetensors")):
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    return tensors


@torch.no_grad()
def logits_of(out: Path, ids: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """fp32 logits of what a run saved: its base model + its adapter, or its full model."""
    from mamba_ft.adapters import adapter_base_model, load_adapters
    from mamba_ft.models import load_model

    if (out / "adapter").is_dir():
        model = load_model(adapter_base_model(out / "adapter"), need_tokenizer=False, allow_transformers=True).model
        load_adapters(model, out / "adapter")
    else:
        model = load_model(str(out / "model"), need_tokenizer=False, allow_transformers=True).model
    model.to(device).eval()
    return model(input_ids=ids.to(device)).logits.float().cpu()


def probes(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("probe-rank*.json"))]


def _worker(argv: list[str]) -> None:
    """Train like `mamba-ft train`, recording what the ops see (one probe file per process)."""
    import mamba_ft.training.distributed as distributed
    from mamba_ft import ops
    from mamba_ft.modules.mamba_mixer import MambaFTMixer
    from mamba_ft.recipe import load_recipe
    from mamba_ft.training.loop import train

    seen: dict = {"conv_weight": set(), "scan_A": set(), "scan_D": set(), "in_proj_weight": set(),
                  "shard": None}
    conv, scan, weights, shard = ops.causal_conv1d, ops.selective_scan, MambaFTMixer.mixer_weights, distributed.shard_model

    def conv_spy(x, weight, *args, **kwargs):
        seen["conv_weight"].add(tuple(weight.shape))
        return conv(x, weight, *args, **kwargs)

    def scan_spy(u, delta, A, *args, **kwargs):
        seen["scan_A"].add(tuple(A.shape))
        if kwargs.get("D") is not None:
            seen["scan_D"].add(tuple(kwargs["D"].shape))
        return scan(u, delta, A, *args, **kwargs)

    def weights_spy(self):
        w = weights(self)
        seen["in_proj_weight"].add(tuple(w.in_proj_weight.shape))
        return w

    def shard_spy(model, *args, **kwargs):
        model = shard(model, *args, **kwargs)
        p = next(m for m in model.modules() if isinstance(m, MambaFTMixer)).in_proj.weight
        seen["shard"] = {"type": type(p).__name__, "full": list(p.shape), "local": list(p.to_local().shape)}
        return model

    ops.causal_conv1d, ops.selective_scan = conv_spy, scan_spy
    MambaFTMixer.mixer_weights = weights_spy
    distributed.shard_model = shard_spy
    rank = int(os.environ.get("RANK", "0"))
    # Several runs in one launch (one start-up): RECIPE OVERRIDES... [--next RECIPE OVERRIDES...]
    groups, group = [], []
    for arg in argv + ["--next"]:
        if arg == "--next":
            groups.append(group)
            group = []
        else:
            group.append(arg)
    for recipe_path, *overrides in groups:
        for value in seen.values():
            if isinstance(value, set):
                value.clear()
        seen["shard"] = None
        recipe = load_recipe(recipe_path, overrides)
        train(recipe)
        record = {k: sorted(map(list, v)) if isinstance(v, set) else v for k, v in seen.items()}
        (Path(recipe.run.output_dir) / f"probe-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _worker(sys.argv[1:])
