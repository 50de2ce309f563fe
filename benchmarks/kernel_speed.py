"""Benchmark mamba-ft's Triton selective scan and causal conv1d on a CUDA GPU.

Times forward and forward+backward (median of `triton.testing.do_bench`; for the conv, of
`do_bench_cudagraph`, which leaves out the host's launch time) at the shapes of
Mamba-130m (batch 8, d 1536) and Mamba-1.4B (batch 4, d 4096), L 2048, N 16, bf16 inputs with
D, z, delta_bias and softplus, and reports effective GB/s from the issue's byte counts
(about 10·d bytes per token forward, 28·d forward+backward). Compares, in the same run, with
the pure-PyTorch reference and, when available, mamba_ssm's CUDA `selective_scan_fn`
(`--mamba-ssm-src` points at an unpacked mamba-ssm source tree; its `selective_scan_cuda`
extension is then built for sm_90 only).

    python benchmarks/kernel_speed.py [--mamba-ssm-src DIR] [--sweep] [--out benchmarks/results]

Writes kernels.json and kernels.md under --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mamba_ft.ops import reference
from mamba_ft.kernels import causal_conv1d as conv_mod
from mamba_ft.kernels import selective_scan as scan_mod

from bench_common import (RESULTS_DIR, compiled_kernel_stats, device_and_versions, gpu_run_info,
                          markdown_table, median_gpu_ms, median_graph_replay_ms,
                          stub_mamba_ssm_package, write_json, write_markdown)

SCAN_SHAPES = [(8, 1536, 2048, 16), (4, 4096, 2048, 16)]


def build_mamba_ssm(src: Path):
    """Import mamba_ssm's selective_scan_fn, compiling its CUDA extension (sm_90) if needed."""
    from torch.utils.cpp_extension import load

    cs = src / "csrc" / "selective_scan"
    sources = [cs / "selective_scan.cpp"] + sorted(cs.glob("selective_scan_*.cu"))
    flags = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
             "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
             "-gencode", "arch=compute_90,code=sm_90"]
    build = Path(os.environ.get("MAMBA_SSM_BUILD", "/tmp/mamba_ssm_build"))
    build.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ext = load(name="selective_scan_cuda", sources=[str(s) for s in sources],
               extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=flags,
               extra_include_paths=[str(cs)], build_directory=str(build), verbose=False)
    sys.modules["selective_scan_cuda"] = ext
    stub_mamba_ssm_package(src)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn, time.time() - t0


def scan_inputs(batch, d, L, N, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def act(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, device="cuda") * scale
        return t.to(torch.bfloat16).contiguous()

    return dict(
        u=act(batch, d, L), delta=act(batch, d, L, scale=0.5),
        A=-torch.exp(torch.rand(d, N, generator=g, device="cuda") * 2.5 - 1),
        B=act(batch, N, L), C=act(batch, N, L),
        D=torch.randn(d, generator=g, device="cuda"), z=act(batch, d, L),
        delta_bias=torch.randn(d, generator=g, device="cuda") * 0.5,
    )


def time_scan(fn, inputs, backward: bool, rep=200):
    if not backward:
        with torch.no_grad():
            return median_gpu_ms(lambda: fn(**inputs, delta_softplus=True), rep=rep)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    grad_out = torch.randn_like(leaves["u"])

    def step():
        y = fn(**leaves, delta_softplus=True)
        torch.autograd.grad(y, list(leaves.values()), grad_out)

    return median_gpu_ms(step, rep=rep)


def bench_scan(mamba_ssm_fn):
    # Contiguous (batch, d, L) inputs: mamba_ssm's layout, and the one mamba-ft's mixer produces.
    layout = "contiguous"
    rows = []
    for batch, d, L, N in SCAN_SHAPES:
        tokens = batch * L
        inputs = scan_inputs(batch, d, L, N)
        impls = {"mamba-ft triton": scan_mod.selective_scan_fn}
        if mamba_ssm_fn is not None:
            impls["mamba_ssm cuda"] = mamba_ssm_fn
        if d == 1536:
            impls["pytorch reference"] = reference.selective_scan
        for name, fn in impls.items():
            rep = 30 if name == "pytorch reference" else 200
            fwd = time_scan(fn, inputs, False, rep)
            fwd_bwd = time_scan(fn, inputs, True, rep)
            rows.append(dict(kind="selective_scan", impl=name, layout=layout, batch=batch,
                             d=d, L=L, N=N, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                             fwd_GBps=10 * d * tokens / fwd / 1e6,
                             fwd_bwd_GBps=28 * d * tokens / fwd_bwd / 1e6))
            print(f"scan {name:18s} b={batch} d={d}: fwd {fwd:.3f} ms, fwd+bwd {fwd_bwd:.3f} ms",
                  flush=True)
        if mamba_ssm_fn is not None:
            with torch.no_grad():
                ours = scan_mod.selective_scan_fn(**inputs, delta_softplus=True).float()
                theirs = mamba_ssm_fn(**inputs, delta_softplus=True).float()
            rows.append(dict(kind="agreement", layout=layout, batch=batch, d=d,
                             max_abs_diff=(ours - theirs).abs().max().item(),
                             ref_max_abs=theirs.abs().max().item()))
    return rows


def sweep_tiles():
    """Forward and fwd+bwd time of other scan tunings (Mamba-130m shape)."""
    rows = []
    inputs = scan_inputs(8, 1536, 2048, 16)
    names = ("MAX_CHUNK", "BWD_SPLIT", "BWD_MAXNREG")
    default = {n: getattr(scan_mod, n) for n in names}
    # (forward chunk, backward chunks per forward chunk, backward register cap); the first
    # is the shipped tuning.
    for chunk, split, maxnreg in [(512, 2, 128), (512, 2, 168), (512, 2, None), (512, 1, None),
                                  (512, 1, 128), (256, 2, 128), (1024, 2, 128)]:
        for n, v in zip(names, (chunk, split, maxnreg)):
            setattr(scan_mod, n, v)
        try:
            fwd = time_scan(scan_mod.selective_scan_fn, inputs, False, 100)
            fb = time_scan(scan_mod.selective_scan_fn, inputs, True, 100)
        except Exception as exc:  # a config the compiler rejects is a result, not a crash
            fwd = fb = float("nan")
            print("sweep failed", chunk, split, maxnreg, type(exc).__name__, exc)
        rows.append(dict(kind="tile_sweep", chunk=chunk, bwd_chunk=chunk // split,
                         bwd_maxnreg=maxnreg, fwd_ms=fwd, fwd_bwd_ms=fb))
        print(f"sweep chunk={chunk} bwd_chunk={chunk // split} maxnreg={maxnreg}: "
              f"fwd {fwd:.3f} fwd+bwd {fb:.3f}", flush=True)
    for n, v in default.items():
        setattr(scan_mod, n, v)
    return rows


def bench_conv():
    # Timed as CUDA-graph replays: the conv's GPU time (tens of microseconds) is shorter than
    # the host's time to launch it through autograd, which median_gpu_ms would measure instead.
    rows = []
    for batch, d, L, width in [(8, 1536, 2048, 4), (4, 4096, 2048, 4)]:
        x = torch.randn(batch, d, L, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d, width, device="cuda", dtype=torch.bfloat16) * 0.5
        b = torch.randn(d, device="cuda", dtype=torch.bfloat16)
        for name, fn in (("mamba-ft triton", conv_mod.causal_conv1d_fn),
                         ("pytorch reference", reference.causal_conv1d)):
            with torch.no_grad():
                fwd = median_graph_replay_ms(lambda: fn(x, w, b))
            leaves = [t.detach().requires_grad_() for t in (x, w, b)]
            g = torch.randn_like(x)
            fb = median_graph_replay_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, g))
            # Fewest bytes: read x, write y (forward); + read x, dy, write dx (backward).
            rows.append(dict(kind="causal_conv1d", impl=name, batch=batch, d=d, L=L,
                             width=width, fwd_ms=fwd, fwd_bwd_ms=fb,
                             fwd_GBps=4 * batch * d * L / fwd / 1e6,
                             fwd_bwd_GBps=10 * batch * d * L / fb / 1e6))
            print(f"conv {name:18s} b={batch} d={d}: fwd {fwd:.3f} ms, fwd+bwd {fb:.3f} ms",
                  flush=True)
    return rows


def copy_bandwidth():
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = median_gpu_ms(lambda: y.copy_(x), warmup=10, rep=50)
    return 2 * x.numel() * 2 / ms / 1e6


def markdown(info, rows):
    lines = [f"{device_and_versions(info)}, CUDA {info['cuda']}; {info['date']}; copy bandwidth "
             f"{info['copy_GBps']:.0f} GB/s (read + write).", ""]
    lines += markdown_table(
        ["op", "impl", "layout", "shape (b, d, L, N/width)", "fwd ms", "fwd GB/s", "fwd+bwd ms",
         "fwd+bwd GB/s"],
        [[r["kind"], r["impl"], r.get("layout", "contiguous"),
          f"({r['batch']}, {r['d']}, {r['L']}, {r.get('N', r.get('width'))})", f"{r['fwd_ms']:.3f}",
          f"{r['fwd_GBps']:.0f}", f"{r['fwd_bwd_ms']:.3f}", f"{r['fwd_bwd_GBps']:.0f}"]
         for r in rows if r["kind"] in ("selective_scan", "causal_conv1d")])
    sweep = [r for r in rows if r["kind"] == "tile_sweep"]
    if sweep:
        lines += [""] + markdown_table(
            ["forward chunk", "backward chunk", "backward register cap", "fwd ms", "fwd+bwd ms"],
            [[r["chunk"], r["bwd_chunk"], r["bwd_maxnreg"] or "none", f"{r['fwd_ms']:.3f}",
              f"{r['fwd_bwd_ms']:.3f}"] for r in sweep])
    agree = [r for r in rows if r["kind"] == "agreement"]
    if agree:
        lines += ["", "Forward agreement with mamba_ssm (bf16 outputs): " + "; ".join(
            f"b={r['batch']} d={r['d']} {r['layout']}: max |diff| {r['max_abs_diff']:.3g} "
            f"(max |y| {r['ref_max_abs']:.3g})" for r in agree)]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mamba-ssm-src", type=Path, default=None)
    p.add_argument("--sweep", action="store_true", help="also time other tile sizes")
    p.add_argument("--build-only", action="store_true", help="only build mamba_ssm's extension")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args()
    extra = {}
    mamba_ssm_fn = None
    if args.mamba_ssm_src is not None:
        try:
            mamba_ssm_fn, secs = build_mamba_ssm(args.mamba_ssm_src)
            extra["mamba_ssm"] = f"2.3.2.post1 selective_scan_cuda built for sm_90 in {secs:.0f} s"
        except Exception as exc:  # report, and still benchmark our own kernels
            extra["mamba_ssm"] = f"build failed: {type(exc).__name__}: {str(exc)[-500:]}"
        print("mamba_ssm:", extra["mamba_ssm"], flush=True)
    if args.build_only:
        return
    extra["copy_GBps"] = copy_bandwidth()
    info = gpu_run_info(python=platform.python_version(), **extra)
    rows = sweep_tiles() if args.sweep else []
    rows += bench_scan(mamba_ssm_fn) + bench_conv()
    info["compiled_scan_kernels"] = compiled_kernel_stats(
        scan_mod, ["_scan_fwd_kernel", "_scan_bwd_kernel"], constants=True)
    for st in info["compiled_scan_kernels"]:
        print("compiled:", st, flush=True)
    # kernels.json/.md: the names the results and docs/benchmarks.md have always used.
    write_json(args.out, "kernels", dict(info=info, rows=rows))
    print(write_markdown(args.out, "kernels", markdown(info, rows)))


if __name__ == "__main__":
    main()
