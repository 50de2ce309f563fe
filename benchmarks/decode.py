"""Greedy generation speed on a CUDA GPU: mamba-ft's one-token kernels against the reference.

Models are built from configs (random init, no downloads) in the shapes of Mamba-130m and
Mamba-1.4B. Each run prefills a 64-token prompt and generates 128 tokens with
`model.generate` (greedy, cache on), once through the one-token Triton steps and once with
`MAMBA_FT_OPS=reference` (the prefill then also takes the reference path, which the prompt
keeps short). Reports generated tokens/s per sequence and in total.

    python benchmarks/decode.py [--out DIR]

Writes decode.json and decode.md under --out.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from mamba_ft.models import load_model

from bench_common import (RESULTS_DIR, device_and_versions, gpu_run_info, markdown_table,
                          wall_seconds_per_call, write_json, write_markdown)

SHAPES = {"130m": (768, 24), "1.4b": (2048, 48)}


def generate_speed(model, batch, prompt, new_tokens, path):
    os.environ["MAMBA_FT_OPS"] = path
    ids = torch.randint(0, 50280, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0)
    outputs = []  # the timed call's tokens, which main compares across the two paths
    with torch.no_grad():
        model.generate(ids, **dict(kw, max_new_tokens=8, min_new_tokens=8))  # warm-up
        secs = wall_seconds_per_call(lambda: outputs.append(model.generate(ids, **kw)), 1, warmup=0)
    os.environ["MAMBA_FT_OPS"] = "auto"
    return dict(tokens_per_s_per_sequence=new_tokens / secs,
                tokens_per_s=batch * new_tokens / secs, sequences=outputs[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args()
    info = gpu_run_info()
    rows = []
    for name, (hidden, layers) in SHAPES.items():
        config = dict(model_type="mamba", vocab_size=50280, hidden_size=hidden,
                      num_hidden_layers=layers, state_size=16, expand=2, conv_kernel=4)
        model = load_model(config, need_tokenizer=False, seed=0).model.cuda().eval()
        for batch in (1, 8):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fused = generate_speed(model, batch, 64, args.new_tokens, "auto")
                ref = generate_speed(model, batch, 64, args.new_tokens, "reference")
            same = bool(torch.equal(fused.pop("sequences"), ref.pop("sequences")))
            row = dict(model=name, batch=batch, kernels=fused, reference=ref,
                       same_tokens=same)
            rows.append(row)
            print(row, flush=True)
        del model
        torch.cuda.empty_cache()
    write_json(args.out, "decode", dict(info=info, rows=rows))
    lines = [f"{device_and_versions(info)}; {info['date']}; bf16 autocast, greedy, 64-token "
             f"prompt, {args.new_tokens} new tokens, random init.", ""]
    table = []
    for r in rows:
        k, ref = r["kernels"]["tokens_per_s"], r["reference"]["tokens_per_s"]
        table.append([r["model"], r["batch"], f"{k:,.0f}", f"{ref:,.0f}", f"{k / ref:.2f}x",
                      r["same_tokens"]])
    lines += markdown_table(["model", "batch", "kernels tokens/s", "reference tokens/s",
                             "speed-up", "same tokens"], table)
    print(write_markdown(args.out, "decode", lines))


if __name__ == "__main__":
    main()
