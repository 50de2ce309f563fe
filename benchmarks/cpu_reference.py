"""CPU training step: mamba-ft's reference path against transformers' pure-PyTorch path.

A Mamba-130m-shaped model (d_model 768, 24 layers, vocab 50280) built from a config (random
init, nothing downloaded), batch 1, length 512, forward + backward, same process, same inputs,
same weights. Peak memory is measured per implementation in a child process (peak resident set
growth over the process's baseline after building the model), since one process's high-water
mark cannot be split between the two.

    python benchmarks/cpu_reference.py [--layers 24] [--length 512] [--steps 2]

Writes benchmarks/results/cpu_reference.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from transformers import MambaConfig, MambaForCausalLM

from mamba_ft.models import swap_mixers

RESULTS = Path(__file__).resolve().parent / "results"


def build(layers: int) -> MambaForCausalLM:
    torch.manual_seed(0)
    config = MambaConfig(hidden_size=768, num_hidden_layers=layers, vocab_size=50280, state_size=16)
    return MambaForCausalLM(config).train()


def step_seconds(model, ids, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
    return times


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory_child(impl: str, layers: int, length: int) -> None:
    model = build(layers)
    if impl == "mamba-ft":
        swap_mixers(model)
    ids = torch.randint(0, 50280, (1, length), generator=torch.Generator().manual_seed(1))
    before = rss_bytes()
    model(ids, labels=ids).loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_extra_bytes": peak - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per implementation (first is warm-up)")
    parser.add_argument("--memory-child", choices=["transformers", "mamba-ft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.layers, args.length)
        return

    hf = build(args.layers)
    ft = copy.deepcopy(hf)
    swap_mixers(ft)
    ids = torch.randint(0, 50280, (1, args.length), generator=torch.Generator().manual_seed(1))
    timings = {"mamba-ft": step_seconds(ft, ids, args.steps), "transformers": step_seconds(hf, ids, args.steps)}
    memory = {}
    for impl in ("mamba-ft", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", impl, "--layers", str(args.layers),
                              "--length", str(args.length)], capture_output=True, text=True, check=True).stdout
        memory[impl] = json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]

    best = {k: min(v[1:] or v) for k, v in timings.items()}
    result = {
        "benchmark": "cpu training step, Mamba-130m shape",
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "shape": {"d_model": 768, "layers": args.layers, "batch": 1, "length": args.length},
        "step_seconds": timings,
        "best_step_seconds": best,
        "tokens_per_second": {k: args.length / v for k, v in best.items()},
        "speedup": best["transformers"] / best["mamba-ft"],
        "peak_extra_gib": {k: v / 2**30 for k, v in memory.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_reference.json").write_text(json.dumps(result, indent=2))
    table = ["| implementation | step (s) | tokens/s | peak extra memory (GiB) |", "|---|---|---|---|"]
    for impl in ("transformers", "mamba-ft"):
        table.append(f"| {impl} | {best[impl]:.2f} | {result['tokens_per_second'][impl]:.1f} | "
                     f"{result['peak_extra_gib'][impl]:.2f} |")
    table.append(f"\nSpeed-up: {result['speedup']:.1f}x ({result['date']}, {result['machine']}, "
                 f"torch {torch.__version__}, transformers {transformers.__version__})")
    (RESULTS / "cpu_reference.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
