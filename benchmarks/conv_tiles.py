"""Tile shapes of the causal conv kernels for inputs contiguous along channels (Mamba-2's rows),
timed on a CUDA GPU: which (channels, positions) tile each direction should use.

Shapes: the conv of Mamba-2-130m (batch 8, 1792 channels: 1536 x + 2 x 128 B/C) and -1.3B
(batch 2, 4352 channels), L 2048, bf16, width 4, SiLU, the input, output and output gradient
all transposed views of (batch, L, channels) tensors, as the mixer hands them over. Each
candidate is patched into `causal_conv1d._TILES_CHANNELS_CONTIGUOUS` and timed
with `triton.testing.do_bench` (median ms): the forward alone, and forward + backward.

    python benchmarks/conv_tiles.py [--out DIR]

Writes conv_tiles.json and conv_tiles.md under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton

from mamba_ft.kernels import causal_conv1d as conv

from bench_common import (RESULTS_DIR, device_and_versions, gpu_run_info, markdown_table,
                          write_json, write_markdown)

SHAPES = {"mamba2-130m": (8, 1792, 2048), "mamba2-1.3b": (2, 4352, 2048)}
TILES = [(32, 32), (64, 16), (64, 32), (128, 8), (128, 16), (256, 8), (32, 64)]


def rows_layout(batch, d, L, requires_grad=False):
    t = torch.randn(batch, L, d, device="cuda", dtype=torch.bfloat16)
    return t.requires_grad_(requires_grad).transpose(1, 2)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args()
    info = gpu_run_info()
    default = dict(conv._TILES_CHANNELS_CONTIGUOUS)
    rows = []
    for name, (batch, d, L) in SHAPES.items():
        x = rows_layout(batch, d, L, requires_grad=True)
        dy = rows_layout(batch, d, L)
        w = torch.randn(d, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        bias = torch.randn(d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for tile in TILES:
            conv._TILES_CHANNELS_CONTIGUOUS.update(fwd=tile, bwd=tile)

            def forward():
                return conv.causal_conv1d_fn(x, w, bias)

            def both():
                torch.autograd.grad(forward(), (x, w, bias), dy)

            fwd, fwd_bwd = triton.testing.do_bench(forward), triton.testing.do_bench(both)
            row = dict(shape=name, tile=tile, fwd_ms=fwd, bwd_ms=fwd_bwd - fwd)
            rows.append(row)
            print(row, flush=True)
    conv._TILES_CHANNELS_CONTIGUOUS.update(default)
    write_json(args.out, "conv_tiles", dict(info=info, default=default, rows=rows))
    lines = [f"{device_and_versions(info)}; {info['date']}; bf16, width 4, SiLU, rows' layout; "
             f"today's tiles: forward {default['fwd']}, backward {default['bwd']}.", ""]
    lines += markdown_table(["shape", "tile (channels, positions)", "forward ms",
                             "backward ms (fwd+bwd - fwd)"],
                            [[r["shape"], str(r["tile"]), f"{r['fwd_ms']:.4f}",
                              f"{r['bwd_ms']:.4f}"] for r in rows])
    print(write_markdown(args.out, "conv_tiles", lines))


if __name__ == "__main__":
    main()
