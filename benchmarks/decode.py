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
import datetime
import json
import os
import sys
import time
from pathlib import Path

# Same reason as in train_throughput.py: keep this folder off sys.path's front.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import torch  # noqa: E402
import triton  # noqa: E402

from mamba_ft.models import load_model  # noqa: E402

SHAPES = {"130m": (768, 24), "1.4b": (2048, 48)}


def generate_speed(model, batch, prompt, new_tokens, path):
    os.environ["MAMBA_FT_OPS"] = path
    ids = torch.randint(0, 50280, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **dict(kw, max_new_tokens=8, min_new_tokens=8))  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    os.environ["MAMBA_FT_OPS"] = "auto"
    return dict(tokens_per_s_per_sequence=new_tokens / secs,
                tokens_per_s=batch * new_tokens / secs, sequences=out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__)
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    lines = [f"Device: {info['device']}; torch {info['torch']}, Triton {info['triton']}; "
             f"{info['date']}; bf16 autocast, greedy, 64-token prompt, {args.new_tokens} new "
             f"tokens, random init.", "",
             "| model | batch | kernels tokens/s | reference tokens/s | speed-up | same tokens |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        k, ref = r["kernels"]["tokens_per_s"], r["reference"]["tokens_per_s"]
        lines.append(f"| {r['model']} | {r['batch']} | {k:,.0f} | {ref:,.0f} | {k / ref:.2f}x | "
                     f"{r['same_tokens']} |")
    md = "\n".join(lines) + "\n"
    (args.out / "decode.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
