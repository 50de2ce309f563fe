"""Decoding speed on a CUDA GPU: mamba-ft against transformers' `generate` and a Pythia.

Models are built from configs (random init, no downloads) in the shapes of Mamba-1.4B
(d_model 2048, 48 layers) and Mamba-2-1.3B, and Pythia-1.4B (GPT-NeoX, SDPA), all with bf16
weights. Each run prefills a 64-token random prompt per row and generates greedily, every row
to the full length (no end-of-sequence stop). Rows:
- mamba-ft, CUDA graph: `mamba_ft.decoding.Decoder`, the one-token step replayed as a graph;
- mamba-ft, eager: the same loop, each step issued from Python;
- transformers: plain `MambaForCausalLM.generate` (its own mixers, on the PyTorch path when
  mamba_ssm is not installed, as on the benchmark machine), and Pythia-1.4B's `generate` with
  its KV cache.

The CUDA-graph rows generate `--new-tokens` (1,000) tokens; the slow rows `--slow-new-tokens`
(fewer: minutes of GPU time otherwise). A Mamba step costs the same at every position, so
their rates compare; a Transformer's step grows with its KV cache, so Pythia's rate over the
shorter run is an upper bound of its rate over 1,000 tokens. Reported: tokens/s end to end
(prefill, capture and decoding, what one `generate` call gives) and per decoding step (the
difference of two run lengths, so prefill and capture cancel). The weight-bandwidth bound is
the bf16 weight bytes a step reads, over this GPU's device-to-device copy bandwidth measured
in the same run.

    python benchmarks/decode.py [--new-tokens 1000] [--slow-new-tokens 100] [--out DIR]

Writes decode.json and decode.md under --out.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from mamba_ft.decoding import Decoder, token_chooser
from mamba_ft.models import load_model

import transformers_baselines
from bench_common import (RESULTS_DIR, device_and_versions, gpu_run_info, markdown_table,
                          wall_seconds_per_call, write_json, write_markdown)

PROMPT = 64
BATCHES = (1, 16)
SHORT_RUN = 16  # new tokens of the short run whose time is subtracted for the per-step rate


def config_for(name: str) -> dict:
    """The model's config with its cache on (the baselines' configs turn it off for training)."""
    if name == "mamba2-1.3b":
        config = transformers_baselines.mamba2_config(2048, 48)
    elif name.startswith("pythia"):
        config = transformers_baselines.pythia_config(name)
    else:
        config = transformers_baselines.mamba_config(2048, 48)
    return dict(config, use_cache=True)


def build(name: str, path: str) -> torch.nn.Module:
    """bf16 weights on the GPU, eval: mamba-ft's model, or plain transformers' ("transformers")."""
    with torch.device("cuda"):
        if path.startswith("mamba-ft"):
            model = load_model(config_for(name), need_tokenizer=False, seed=0).model
        else:
            model = transformers_baselines.from_config(config_for(name))
    return model.to(torch.bfloat16).eval()


def timed_generate(model, path: str, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds for one greedy generation of `new_tokens` tokens per row."""
    def generate():
        with torch.no_grad():
            if path.startswith("mamba-ft"):
                decoder = Decoder(model, cuda_graph=path == "mamba-ft, CUDA graph")
                decoder.generate(ids, new_tokens, token_chooser(model))
            else:
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0, eos_token_id=None)

    return wall_seconds_per_call(generate, 1, warmup=0)


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decoding step reads: every parameter but the input embedding
    table (one row of it is read), counted once where the head shares it."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if head is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def copy_bandwidth_bytes_per_s() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), 2 GiB buffers."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = wall_seconds_per_call(lambda: dst.copy_(src), 10)
    return 2 * 2**31 / seconds


def measure(name: str, path: str, batch: int, new_tokens: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    model = build(name, path)
    ids = torch.randint(0, 50000, (batch, PROMPT), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    timed_generate(model, path, ids, 4)  # warm-up: Triton compiles, cuBLAS handles
    short = timed_generate(model, path, ids, SHORT_RUN)
    full = timed_generate(model, path, ids, new_tokens)
    step_s = (full - short) / (new_tokens - SHORT_RUN)
    row = dict(model=name, path=path, batch=batch, new_tokens=new_tokens, seconds=full,
               tokens_per_s=batch * new_tokens / full, step_ms=1e3 * step_s,
               step_tokens_per_s=batch / step_s, weight_bytes=weight_bytes_per_step(model))
    del model
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=1000)
    p.add_argument("--slow-new-tokens", type=int, default=100,
                   help="new tokens for the eager and transformers rows")
    p.add_argument("--only", nargs="+", default=None, help="run only rows of these paths")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args()
    info = gpu_run_info()
    bandwidth = copy_bandwidth_bytes_per_s()
    runs = [("1.4b", "mamba-ft, CUDA graph", args.new_tokens),
            ("mamba2-1.3b", "mamba-ft, CUDA graph", args.new_tokens),
            ("1.4b", "mamba-ft, eager", args.slow_new_tokens),
            ("1.4b", "transformers", args.slow_new_tokens),
            ("pythia-1.4b", "transformers", args.slow_new_tokens)]
    rows = []
    for name, path, new_tokens in runs:
        if args.only and path not in args.only:
            continue
        for batch in BATCHES:
            row = measure(name, path, batch, new_tokens)
            row["bound_tokens_per_s"] = batch * bandwidth / row["weight_bytes"]
            rows.append(row)
            print(row, flush=True)
    write_json(args.out, "decode", dict(info=info, copy_bandwidth_GB_s=bandwidth / 1e9,
                                        rows=rows))
    lines = [f"{device_and_versions(info)}; {info['date']}; bf16 weights, greedy, "
             f"{PROMPT}-token prompts, random init; device-to-device copy bandwidth "
             f"{bandwidth / 1e9:,.0f} GB/s.", ""]
    table = [[r["model"], r["path"], r["batch"], r["new_tokens"], f"{r['tokens_per_s']:,.0f}",
              f"{r['step_tokens_per_s']:,.0f}", f"{r['step_ms']:.2f}",
              f"{r['step_tokens_per_s'] / r['bound_tokens_per_s']:.2f}"] for r in rows]
    lines += markdown_table(["model", "path", "batch", "new tokens", "tokens/s end to end",
                             "tokens/s per step", "ms per step",
                             "fraction of the weight-bandwidth bound"], table)
    print(write_markdown(args.out, "decode", lines))


if __name__ == "__main__":
    main()
