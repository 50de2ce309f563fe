"""Where a training step's time goes: GPU time by kernel and by kind, and the host's share.

Profiles the step of benchmarks/train_throughput.py (same model shapes, loss and optimizer)
with torch.profiler and sums device time per kernel name over the profiled steps. It also
reports the wall time of a step (timed without the profiler) and the host (CPU) time the
step's ops take, with the ops that take most: when the host time exceeds the GPU time, the
GPU waits for launches and the step is host-bound.

    python benchmarks/profile_step.py [--run 130m:full:8] [--run 1.4b:lora:2:fused+bf16-frozen]
                                      [--run qlora:1.4b:nf4-embeddings:2] [--out DIR]

A run is model:mode:batch[:ops], ops as in train_throughput.py's table (default "fused"), or
qlora:shape:base:batch[:recompute] for a row of benchmarks/qlora_throughput.py (its shapes,
bases and recompute options, default none), or decode:model:batch for one decoding step of
benchmarks/decode.py's mamba-ft model, run eagerly (the kernels its CUDA graph replays).

Writes profile_step.json and profile_step.md under --out.
"""

from __future__ import annotations

import argparse
import gc
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_common import (RESULTS_DIR, device_and_versions, gpu_run_info, markdown_table,
                          wall_seconds_per_call, write_json, write_markdown)
from train_throughput import make_step

# Kernel name fragments -> kind, first match wins. Matmuls come from cuBLAS (nvjet, sm90_xmma,
# cutlass, gemm); the scans, SSD, conv and norms are mamba-ft's Triton kernels.
KINDS = [
    ("scan forward", ("_scan_fwd",)),
    ("scan backward", ("_scan_bwd",)),
    ("SSD forward", ("_dt_cumsum", "_cb_kernel", "_chunk_state", "_state_pass_fwd", "_chunk_out")),
    ("SSD backward", ("_dstate_local", "_state_pass_bwd", "_dx_", "_dc_", "_db_", "_dcb",
                      "_dt_bwd")),
    ("norm", ("_rms", "_gated", "norm")),
    ("dequantise (bitsandbytes)", ("dequant",)),
    ("embedding / gather", ("embedding", "index", "gather", "scatter")),
    ("conv", ("_conv",)),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
    ("optimizer", ("adam",)),
    ("cross-entropy / softmax", ("softmax", "nll", "log_softmax", "cross_entropy")),
    ("reduction", ("reduce",)),
    ("copy / cast", ("copy", "cast", "Memcpy", "Memset", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k.lower() in low for k in keys):
            return kind
    return "other"


def qlora_step(shape, base, batch, recompute, L):
    """The step of one qlora_throughput.py row: the quantised model, its adapters and AdamW."""
    import qlora_throughput as q

    device = torch.device("cuda")
    model, _ = q.build_row_model(q.build_master(shape, device), base, recompute, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    return q.make_step(model, batch, L, q.MODELS[shape]["vocab_size"], device, opt, [])


def decode_step(name, batch):
    """One eager one-token step of benchmarks/decode.py's mamba-ft model (bf16 weights) after a
    64-token prefill: the kernels a replayed CUDA-graph step runs, one launch each."""
    import decode
    from mamba_ft.decoding import Decoder, output_cache

    model = decode.build(name, "mamba-ft, eager")
    decoder = Decoder(model, cuda_graph=False)
    ids = torch.randint(0, 50000, (batch, decode.PROMPT), device="cuda")
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
    token = ids[:, -1:].clone()

    @torch.no_grad()
    def step():
        decoder._forward(token, cache)

    return step


def profile_run(step, L, steps, **labels):
    wall_ms = wall_seconds_per_call(step, steps) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0.0, 0])
    host_ops = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[ev.name]
            entry[0] += ev.device_time_total / 1e3 / steps  # ms per step
            entry[1] += 1
        else:
            host_ops[ev.name] += ev.self_cpu_time_total / 1e3 / steps
    total = sum(v[0] for v in per_kernel.values())
    kernels = sorted(({"name": k, "kind": kind_of(k), "ms_per_step": v[0],
                       "calls_per_step": v[1] / steps} for k, v in per_kernel.items()),
                     key=lambda r: -r["ms_per_step"])
    kinds = defaultdict(float)
    for r in kernels:
        kinds[r["kind"]] += r["ms_per_step"]
    host = sorted(host_ops.items(), key=lambda kv: -kv[1])
    return dict(labels, L=L, steps=steps, wall_ms_per_step=wall_ms,
                gpu_ms_per_step=total, host_ms_per_step=sum(host_ops.values()),
                kinds=dict(sorted(kinds.items(), key=lambda kv: -kv[1])), kernels=kernels,
                host_ops=[dict(name=k, ms_per_step=v) for k, v in host[:40]])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=None,
                   help="model:mode:batch[:ops], e.g. 130m:full:8 (repeatable)")
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args()
    runs = args.run or ["130m:full:8", "1.4b:lora:2"]
    info = gpu_run_info()
    results = []
    lines = [f"{device_and_versions(info)}; {info['date']}; bf16 autocast, AdamW, L={args.L}, "
             "random init.", ""]
    for spec in runs:
        if spec.startswith("decode:"):
            _, model, batch = spec.split(":")
            mode, ops = "decode", "one eager token step"
            step = decode_step(model, int(batch))
        elif spec.startswith("qlora:"):
            _, model, base, batch, *recompute = spec.split(":")
            mode, ops = "lora", f"{base}, recompute {recompute[0] if recompute else 'none'}"
            step = qlora_step(model, base, int(batch), recompute[0] if recompute else "none", args.L)
        else:
            model, mode, batch, *ops = spec.split(":")
            ops = ops[0] if ops else "fused"
            step, _, _ = make_step(model, mode, ops, int(batch), args.L)
        r = profile_run(step, args.L, args.steps, model=model, mode=mode, batch=int(batch), ops=ops)
        results.append(r)
        del step
        gc.collect()
        torch.cuda.empty_cache()
        total = r["gpu_ms_per_step"]
        lines += [f"## {model} {mode} ({ops}), batch {batch}: {total:.1f} ms of kernels per step", "",
                  f"Wall time per step (no profiler): {r['wall_ms_per_step']:.1f} ms; host time "
                  f"of the step's ops (profiled, which slows the host somewhat): "
                  f"{r['host_ms_per_step']:.1f} ms.", ""]
        lines += markdown_table(["kind", "ms per step", "share"],
                                [[k, f"{v:.2f}", f"{v / total:.1%}"] for k, v in r["kinds"].items()])
        lines += [""] + markdown_table(
            ["kernel", "kind", "calls", "ms per step", "share"],
            [[f"`{k['name'][:90]}`", k["kind"], f"{k['calls_per_step']:.0f}",
              f"{k['ms_per_step']:.2f}", f"{k['ms_per_step'] / total:.1%}"]
             for k in r["kernels"][:args.top]])
        lines += [""] + markdown_table(
            ["host op (self time)", "ms per step"],
            [[f"`{h['name'][:80]}`", f"{h['ms_per_step']:.2f}"] for h in r["host_ops"][:12]])
        lines.append("")
        print("\n".join(lines[-(args.top + 40):]), flush=True)
    write_json(args.out, "profile_step", dict(info=info, runs=results))
    write_markdown(args.out, "profile_step", lines)


if __name__ == "__main__":
    main()
