"""Training at long context on a CUDA GPU: Mamba-1.4B LoRA against Pythia-1.4B LoRA, tokens/s
and peak memory against the sequence length L (batch 1).

Both are built from configs (random init, no downloads), trained as in
`train_throughput.py` (bf16 autocast, AdamW, random token ids) at L = 2k ... 256k:
- Mamba-1.4B, LoRA rank 8 on every target, with the settings that keep memory flat in L:
  the frozen base in bf16 (`precision.frozen_base: bf16`), the head run a chunk of rows at a
  time inside the loss (`run.chunked_head_loss`: no full-length fp32 logits) and whole blocks
  recomputed in the backward (`model.checkpoint_blocks`);
- Pythia-1.4B (GPT-NeoX, SDPA), PEFT LoRA rank 8 on query_key_value and dense, with
  transformers' gradient checkpointing, its own loss over full fp32 logits, as users run it.
A length that runs out of memory is recorded as such, and the JSON is written after every
row, so a run cut short keeps what it measured.

    python benchmarks/long_context.py [--lengths 2048 8192 ...] [--out DIR]
    python benchmarks/long_context.py --plot RESULTS.json --png docs/long_context.png

Writes long_context.json and long_context.md under --out; --plot draws tokens/s and peak
memory against L from a results file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import train_throughput
from bench_common import (RESULTS_DIR, device_and_versions, gpu_run_info, markdown_table,
                          write_json, write_markdown)

LENGTHS = (2048, 8192, 32768, 65536, 131072, 262144)
RUNS = {  # label: (model, ops path as train_throughput names it)
    "Mamba-1.4B LoRA (bf16 frozen base, chunked head, blocks recomputed)":
        ("1.4b", "fused+bf16-frozen+chunked-head+blocks"),
    "Pythia-1.4B LoRA (gradient checkpointing)": ("pythia-1.4b", "transformers+blocks"),
}


def steps_for(L: int) -> tuple[int, int]:
    """(timed steps, warm-up steps): fewer where one step takes many seconds."""
    return (3, 1) if L <= 32768 else (2, 1)


def measure(out: Path, lengths, labels) -> None:
    info = gpu_run_info()
    rows = []
    for label in labels:
        name, path = RUNS[label]
        for L in lengths:
            steps, warmup = steps_for(L)
            try:
                row = train_throughput.run(name, "lora", path, 1, L, steps, warmup)
            except torch.cuda.OutOfMemoryError:
                row = dict(model=name, ops=path, L=L, error="out of memory")
            row["label"] = label
            rows.append(row)
            print(row, flush=True)
            write_json(out, "long_context", dict(info=info, rows=rows))
            if "error" in row:  # longer sequences need more memory still
                break
    lines = [f"{device_and_versions(info)}; {info['date']}; batch 1, LoRA rank 8, bf16 "
             "autocast, AdamW, random init.", ""]
    lines += markdown_table(
        ["run", "L", "tokens/s", "peak GiB"],
        [[r["label"], f"{r['L']:,}"] + ([r["error"], ""] if "error" in r else
                                        [f"{r['tokens_per_s']:,.0f}", f"{r['peak_GiB']:.1f}"])
         for r in rows])
    print(write_markdown(out, "long_context", lines))


def plot(results: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["label"] for r in data["rows"]):
        done = [r for r in data["rows"] if r["label"] == label and "error" not in r]
        failed = [r for r in data["rows"] if r["label"] == label and "error" in r]
        line, = speed.plot([r["L"] for r in done], [r["tokens_per_s"] for r in done], "o-",
                           label=label)
        memory.plot([r["L"] for r in done], [r["peak_GiB"] for r in done], "o-",
                    color=line.get_color(), label=label)
        for r in failed:
            memory.axvline(r["L"], color=line.get_color(), linestyle=":")
            memory.annotate("out of memory", (r["L"], memory.get_ylim()[1] * 0.9),
                            color=line.get_color(), rotation=90, ha="right", fontsize=8)
    for ax, ylabel in ((speed, "tokens/s"), (memory, "peak GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L (batch 1)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    speed.legend(fontsize=7)
    info = data["info"]
    fig.suptitle(f"Training at long context: {info['device']}, {info['date'][:10]}", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(png)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    p.add_argument("--runs", nargs="+", choices=["mamba", "pythia"], default=["mamba", "pythia"])
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--plot", type=Path, default=None, help="a long_context.json to plot")
    p.add_argument("--png", type=Path, default=Path("docs/long_context.png"))
    args = p.parse_args()
    if args.plot is not None:
        plot(args.plot, args.png)
        return
    labels = [label for label in RUNS if label.split("-")[0].lower() in args.runs]
    measure(args.out, args.lengths, labels)


if __name__ == "__main__":
    main()
