"""CPU training step: mamba-ft's reference path against transformers' pure-PyTorch path.

A Mamba-130m-shaped model (d_model 768, 24 layers, vocab 50280) built from a config (random
init, nothing downloaded), batch 1, length 512, forward + backward, same process, same inputs,
same weights. Both implementations are first warmed up on a one-layer model (allocator, code
paths), then timed. Peak memory of a step is the growth of the resident set's high-water mark
over the resident set before the step, after resetting the mark (Linux: /proc/self/clear_refs).
Run it on an otherwise idle machine: the two are timed one after the other.

    python benchmarks/cpu_reference.py [--layers 24] [--length 512] [--steps 1] [--out DIR]

Writes cpu_reference.json and .md under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from transformers import MambaConfig, MambaForCausalLM

from mamba_ft.models import swap_mixers

from bench_common import RESULTS_DIR, markdown_table, write_json, write_markdown


def build(layers: int) -> MambaForCausalLM:
    torch.manual_seed(0)
    config = MambaConfig(hidden_size=768, num_hidden_layers=layers, vocab_size=50280, state_size=16)
    return MambaForCausalLM(config).train()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the resident set's high-water mark


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def timed_steps(model, ids, steps: int) -> tuple[list[float], int]:
    """Seconds per forward+backward step, and the step's peak extra resident memory."""
    times, peak_extra = [], 0
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        gc.collect()
        before = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
        peak_extra = max(peak_extra, peak_rss_bytes() - before)
    return times, peak_extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per implementation")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    ids = torch.randint(0, 50280, (1, args.length), generator=torch.Generator().manual_seed(1))
    warm = build(1)
    warm_ft = copy.deepcopy(warm)
    swap_mixers(warm_ft)
    timed_steps(warm, ids, 1), timed_steps(warm_ft, ids, 1)
    del warm, warm_ft

    hf = build(args.layers)
    ft = copy.deepcopy(hf)
    swap_mixers(ft)
    timings, memory = {}, {}
    for impl, model in (("mamba-ft", ft), ("transformers", hf)):
        timings[impl], memory[impl] = timed_steps(model, ids, args.steps)

    best = {k: min(v) for k, v in timings.items()}
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
    write_json(args.out, "cpu_reference", result, indent=2)
    lines = markdown_table(
        ["implementation", "step (s)", "tokens/s", "peak extra memory (GiB)"],
        [[impl, f"{best[impl]:.2f}", f"{result['tokens_per_second'][impl]:.1f}",
          f"{result['peak_extra_gib'][impl]:.2f}"] for impl in ("transformers", "mamba-ft")])
    lines += ["", f"Speed-up: {result['speedup']:.1f}x ({result['date']}, {result['machine']}, "
                  f"torch {torch.__version__}, transformers {transformers.__version__})"]
    print(write_markdown(args.out, "cpu_reference", lines), end="")


if __name__ == "__main__":
    main()
