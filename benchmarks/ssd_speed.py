"""Benchmark mamba-ft's Triton Mamba-2 SSD scan against mamba_ssm's Triton one on a CUDA GPU.

Times forward and forward+backward (median of `triton.testing.do_bench`, CUDA events after
warmup) of `mamba_chunk_scan_combined` at Mamba-2-130m's layer shape (batch 8, L 2048,
heads 24, head_dim 64, N 128, groups 1, chunk 256) and Mamba-2-1.3B's (heads 64, batch 2 and
8), bf16 inputs with D and dt_bias + softplus, no z, for mamba-ft's kernel, mamba_ssm's
Triton kernels (`--mamba-ssm-src` points at an unpacked mamba-ssm source tree; its Triton SSD
needs no compiling, but imports einops) and, at the 130m shape, the pure-PyTorch reference.
Also reports how far mamba-ft's output and gradients are from mamba_ssm's (max |diff|).
mamba_ssm's kernels autotune on first use at each shape: on an H100 that took more than a
minute at the first shape, so give a run four minutes or more. einops is not installed on
the GPU machine; carry its wheel (the import failure is reported, and the rest still runs).

    python benchmarks/ssd_speed.py [--mamba-ssm-src DIR] [--out benchmarks/results]

Writes ssd_speed.json and ssd_speed.md under --out.
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import torch

from mamba_ft.kernels import ssd as ssd_mod
from mamba_ft.ops import ssd_reference

from bench_common import (RESULTS_DIR, compiled_kernel_stats, device_and_versions, gpu_run_info,
                          markdown_table, median_gpu_ms, median_graph_replay_ms,
                          stub_mamba_ssm_package, write_json,
                          write_markdown)

# (model, batch, L, heads, head_dim, groups, N, chunk)
SHAPES = [
    ("mamba2-130m", 8, 2048, 24, 64, 1, 128, 256),
    ("mamba2-1.3b", 2, 2048, 64, 64, 1, 128, 256),
    ("mamba2-1.3b", 8, 2048, 64, 64, 1, 128, 256),
]
GRAD_NAMES = ["x", "dt", "A", "B", "C", "D", "dt_bias"]


def import_mamba_ssm(src: Path):
    """mamba_ssm's Triton `mamba_chunk_scan_combined`, imported without running
    mamba_ssm/__init__.py (which pulls in its CUDA extensions and the Mamba modules): a stub
    package module whose path is the source tree's."""
    stub_mamba_ssm_package(src)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def ssd_inputs(batch, L, heads, head_dim, groups, N, seed=0):
    """Inputs at a trained Mamba-2's scales, bf16 activations, fp32 parameters."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def act(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    return dict(
        x=act(batch, L, heads, head_dim), dt=act(batch, L, heads, scale=0.5),
        A=-torch.exp(torch.rand(heads, generator=g, device="cuda") * 2.5 - 1),
        B=act(batch, L, groups, N, scale=0.5), C=act(batch, L, groups, N, scale=0.5),
        D=torch.randn(heads, generator=g, device="cuda"),
        dt_bias=torch.randn(heads, generator=g, device="cuda") * 0.5,
    )


def call(fn, inputs, chunk):
    return fn(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk,
              D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True)


def time_ssd(fn, inputs, chunk, backward: bool, rep: int, graphed: bool = False):
    """Median ms per call: as launched from Python (`median_gpu_ms`, which counts the host's
    launch time wherever it exceeds the GPU's), or replayed as a CUDA graph (the GPU's time
    alone, as inside a graphed training step)."""
    timer = median_graph_replay_ms if graphed else median_gpu_ms
    if not backward:
        def forward():
            with torch.no_grad():
                call(fn, inputs, chunk)

        return timer(forward, rep=rep)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    grad_out = torch.randn_like(leaves["x"])

    def step():
        torch.autograd.grad(call(fn, leaves, chunk), list(leaves.values()), grad_out)

    return timer(step, rep=rep)


def agreement(ours_fn, theirs_fn, inputs, chunk):
    """max |ours - theirs| of y and of every gradient, with each tensor's max |theirs|."""
    out = {}
    results = []
    for fn in (ours_fn, theirs_fn):
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        y = call(fn, leaves, chunk)
        g = torch.Generator(device="cuda").manual_seed(1)
        grads = torch.autograd.grad(y, [leaves[n] for n in GRAD_NAMES],
                                    torch.randn(y.shape, generator=g, device="cuda",
                                                dtype=y.dtype))
        results.append([y.detach()] + list(grads))
    for name, a, b in zip(["y"] + GRAD_NAMES, *results):
        out[name] = dict(max_abs_diff=(a.float() - b.float()).abs().max().item(),
                         ref_max_abs=b.float().abs().max().item())
    return out


def bench(mamba_ssm_fn):
    rows = []
    for model, batch, L, heads, head_dim, groups, N, chunk in SHAPES:
        inputs = ssd_inputs(batch, L, heads, head_dim, groups, N)
        impls = {"mamba-ft triton": ssd_mod.mamba_chunk_scan_combined}
        if mamba_ssm_fn is not None:
            impls["mamba_ssm triton"] = mamba_ssm_fn
        if model == "mamba2-130m":
            impls["pytorch reference"] = ssd_reference.mamba_chunk_scan_combined
        shape = dict(model=model, batch=batch, L=L, heads=heads, head_dim=head_dim,
                     groups=groups, N=N, chunk=chunk)
        for name, fn in impls.items():
            rep = 20 if name == "pytorch reference" else 100
            try:
                fwd = time_ssd(fn, inputs, chunk, False, rep)
                fwd_bwd = time_ssd(fn, inputs, chunk, True, rep)
            except Exception as exc:  # a failing implementation is a result; time the others
                print(f"{model} b={batch} {name}: failed: {type(exc).__name__}: "
                      f"{str(exc)[-1500:]}", flush=True)
                fwd = fwd_bwd = float("nan")
            graph_fwd = graph_fwd_bwd = float("nan")
            if name != "pytorch reference" and not math.isnan(fwd_bwd):
                try:
                    graph_fwd = time_ssd(fn, inputs, chunk, False, rep, graphed=True)
                    graph_fwd_bwd = time_ssd(fn, inputs, chunk, True, rep, graphed=True)
                except Exception as exc:  # not capturable: say so, keep the eager figures
                    print(f"{model} b={batch} {name}: graph capture failed: "
                          f"{type(exc).__name__}: {str(exc)[-500:]}", flush=True)
            rows.append(dict(kind="ssd", impl=name, **shape, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                             graph_fwd_ms=graph_fwd, graph_fwd_bwd_ms=graph_fwd_bwd))
            print(f"{model} b={batch} {name:18s}: fwd {fwd:.3f} ms, fwd+bwd {fwd_bwd:.3f} ms; "
                  f"graphed {graph_fwd:.3f} / {graph_fwd_bwd:.3f} ms", flush=True)
        if mamba_ssm_fn is not None and not math.isnan(rows[-len(impls)]["fwd_bwd_ms"]):
            diffs = agreement(ssd_mod.mamba_chunk_scan_combined, mamba_ssm_fn, inputs, chunk)
            rows.append(dict(kind="agreement", **shape, diffs=diffs))
            print(f"{model} b={batch} vs mamba_ssm: " + ", ".join(
                f"{k} {v['max_abs_diff']:.3g}/{v['ref_max_abs']:.3g}" for k, v in diffs.items()),
                flush=True)
        del inputs
        torch.cuda.empty_cache()
    return rows


SWEEP_NAMES = ("BLOCK_T_MAX", "NUM_WARPS", "BWD_WARPS", "BWD_STAGES", "MIN_PROGRAMS")
SWEEP = [  # values of SWEEP_NAMES; the first is the shipped tuning
    (64, 4, 8, None, 264), (64, 4, 4, None, 264), (64, 4, 8, 1, 264), (64, 8, 8, None, 264),
    (64, 4, 8, None, 1024), (64, 4, 4, None, 1024), (32, 4, 4, None, 264),
    (32, 4, 8, None, 264), (32, 4, 4, None, 1024),
]


def sweep():
    """mamba-ft's forward and fwd+bwd time at the first shape under other tunings."""
    names = SWEEP_NAMES
    default = {n: getattr(ssd_mod, n) for n in names}
    model, batch, L, heads, head_dim, groups, N, chunk = SHAPES[0]
    inputs = ssd_inputs(batch, L, heads, head_dim, groups, N)
    rows = []
    for config in SWEEP:
        for n, v in zip(names, config):
            setattr(ssd_mod, n, v)
        try:
            fwd = time_ssd(ssd_mod.mamba_chunk_scan_combined, inputs, chunk, False, 50)
            fb = time_ssd(ssd_mod.mamba_chunk_scan_combined, inputs, chunk, True, 50)
        except Exception as exc:  # a config the compiler rejects is a result, not a crash
            fwd = fb = float("nan")
            print("sweep failed", config, type(exc).__name__, str(exc)[-300:], flush=True)
        rows.append(dict(kind="sweep", model=model, batch=batch,
                         **dict(zip(names, config)), fwd_ms=fwd, fwd_bwd_ms=fb))
        print(f"sweep {dict(zip(names, config))}: fwd {fwd:.3f} fwd+bwd {fb:.3f}", flush=True)
    for n, v in default.items():
        setattr(ssd_mod, n, v)
    return rows


def kernel_breakdown(fns, steps=10):
    """GPU microseconds per forward+backward step of each kernel, per implementation, at the
    first shape (torch.profiler): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    model, batch, L, heads, head_dim, groups, N, chunk = SHAPES[0]
    inputs = ssd_inputs(batch, L, heads, head_dim, groups, N)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    grad_out = torch.randn_like(leaves["x"])
    out = {}
    for name, fn in fns.items():
        step = lambda: torch.autograd.grad(call(fn, leaves, chunk), list(leaves.values()),
                                           grad_out)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        per_kernel = {e.key[:60]: e.device_time_total / steps for e in prof.key_averages()
                      if e.device_time_total > 0}
        out[name] = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:16])
        print(f"kernels of {name} ({model} b={batch}, us per fwd+bwd):", flush=True)
        for k, us in out[name].items():
            print(f"  {us:9.1f}  {k}", flush=True)
    return out


def markdown(info, rows):
    lines = [f"{device_and_versions(info)}, CUDA {info['cuda']}; {info['date']}; mamba_ssm: "
             f"{info['mamba_ssm']}.", "",
             "Mamba-2 SSD scan (`mamba_chunk_scan_combined`), bf16 inputs, D, dt_bias + "
             "softplus, no z; median ms per call, as launched from Python (host launch time "
             "counts where it exceeds the GPU's) and replayed as a CUDA graph (GPU time "
             "alone).", ""]
    timed = [r for r in rows if r["kind"] == "ssd"]
    lines += markdown_table(
        ["model", "batch", "L", "heads", "head_dim", "N", "chunk", "impl", "fwd ms",
         "fwd+bwd ms", "graphed fwd ms", "graphed fwd+bwd ms"],
        [[r["model"], r["batch"], r["L"], r["heads"], r["head_dim"], r["N"], r["chunk"],
          r["impl"], f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}",
          f"{r.get('graph_fwd_ms', float('nan')):.3f}",
          f"{r.get('graph_fwd_bwd_ms', float('nan')):.3f}"] for r in timed])
    swept = [r for r in rows if r["kind"] == "sweep"]
    if swept:
        lines += ["", f"mamba-ft tunings at {swept[0]['model']} batch {swept[0]['batch']}:", ""]
        lines += markdown_table(
            list(SWEEP_NAMES) + ["fwd ms", "fwd+bwd ms"],
            [[r[n] for n in SWEEP_NAMES] + [f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}"]
             for r in swept])
    agree = [r for r in rows if r["kind"] == "agreement"]
    if agree:
        lines += ["", "Agreement with mamba_ssm (bf16; max |mamba-ft - mamba_ssm| / max "
                  "|mamba_ssm|, output and gradients):", ""]
        lines += markdown_table(
            ["model", "batch"] + ["y"] + [f"d{n}" for n in GRAD_NAMES],
            [[r["model"], r["batch"]] + [
                f"{r['diffs'][n]['max_abs_diff']:.3g} / {r['diffs'][n]['ref_max_abs']:.3g}"
                for n in ["y"] + GRAD_NAMES] for r in agree])
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mamba-ssm-src", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--sweep", action="store_true", help="also time other tunings")
    p.add_argument("--no-profile", action="store_true", help="skip the per-kernel breakdown")
    args = p.parse_args()
    mamba_ssm_fn = None
    status = "not requested (--mamba-ssm-src)"
    if args.mamba_ssm_src is not None:
        try:
            mamba_ssm_fn = import_mamba_ssm(args.mamba_ssm_src)
            status = f"Triton SSD from {args.mamba_ssm_src}"
        except ModuleNotFoundError as exc:  # einops, most likely: say so, time the rest
            status = f"import failed, missing module {exc.name!r} (carry its wheel)"
        except Exception as exc:  # report, and still benchmark our own kernel
            status = f"import failed: {type(exc).__name__}: {str(exc)[-300:]}"
        print("mamba_ssm:", status, flush=True)
    info = gpu_run_info(python=platform.python_version(), mamba_ssm=status)
    rows = bench(mamba_ssm_fn)
    fns = {"mamba-ft triton": ssd_mod.mamba_chunk_scan_combined}
    if mamba_ssm_fn is not None:
        fns["mamba_ssm triton"] = mamba_ssm_fn
    if not args.no_profile:
        info["kernel_us_per_fwd_bwd"] = kernel_breakdown(fns)
    if args.sweep:
        rows += sweep()
    info["compiled_kernels"] = compiled_kernel_stats(
        ssd_mod, [n for n in dir(ssd_mod) if n.startswith("_") and n.endswith("_kernel")])
    for st in info["compiled_kernels"]:
        print("compiled:", st, flush=True)
    write_json(args.out, "ssd_speed", dict(info=info, rows=rows))
    print(write_markdown(args.out, "ssd_speed", markdown(info, rows)))


if __name__ == "__main__":
    main()
