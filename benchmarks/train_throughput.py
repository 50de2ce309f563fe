"""Training-step throughput of mamba-ft on a CUDA GPU: tokens/s and peak memory.

Models are built from configs (random init, no downloads) in the shapes of Mamba-130m
(d_model 768, 24 layers) and Mamba-1.4B (d_model 2048, 48 layers), and of Mamba-2-130m and
-1.3B (the same widths and depths, head_dim 64, state 128, chunk 256), vocab 50280. One step is
forward + backward + AdamW under bf16 autocast at L 2048, on random token ids.

Runs: full fine-tuning and LoRA on all targets (rank 8) through the fused kernels, with and
without recomputing the SSM branch in the backward (`set_recompute_ssm`), LoRA with the frozen
base weights stored in bf16 (`precision.frozen_base: bf16`), and with the forward and
backward replayed as one CUDA graph (`run.cuda_graphs`, mamba_ft.training.cuda_graph), with the
head run in chunks inside the loss (`run.chunked_head_loss`: no full logits) and whole blocks
recomputed in the backward (`model.checkpoint_blocks`); the pure-PyTorch
reference path (`MAMBA_FT_OPS=reference`) for Mamba-130m as a baseline. A ~1.2B Nemotron-H
(hybrid: Mamba-2, attention and MLP layers) with adapters on every buffer. In the same run, the
baselines of `transformers_baselines.py` (ops `transformers`): Pythia-160m / -1.4B with SDPA,
and transformers' own Mamba-2 and Nemotron-H (+ PEFT) with mamba_ssm's Triton SSD patched in
(`--mamba-ssm-src`). The ops column names the path and its options joined by "+".

    python benchmarks/train_throughput.py [--only 130m mamba2-130m ...] [--ops fused+graph ...]
        [--no-reference] [--mamba-ssm-src .mamba_ssm_src] [--out DIR]

Writes train_throughput.json and train_throughput.md under --out.
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import torch

from mamba_ft.models import load_model, set_recompute_ssm
from mamba_ft.training.step import forward_loss_sum

import transformers_baselines
from bench_common import (RESULTS_DIR, device_and_versions, gpu_run_info, markdown_table,
                          wall_seconds_per_call, write_json, write_markdown)

MODELS = {
    "130m": dict(hidden_size=768, num_hidden_layers=24, batch=8),
    "1.4b": dict(hidden_size=2048, num_hidden_layers=48, batch=4),
    # Mamba-2 in the shapes of state-spaces/mamba2-130m and -1.3b (head_dim 64, state 128,
    # one B/C group, chunk 256): the SSD kernels, the gated norm and the conv.
    "mamba2-130m": dict(hidden_size=768, num_hidden_layers=24, batch=8, mamba2=True),
    "mamba2-1.3b": dict(hidden_size=2048, num_hidden_layers=48, batch=2, mamba2=True),
    # A ~1.2B Nemotron-H (transformers_baselines.nemotron_h_config): the hybrid row.
    "nemotron_h-1b": dict(batch=2, hybrid=True),
    # Transformer baselines (transformers_baselines.py): ops "transformers", or mamba-ft's step.
    "pythia-160m": dict(batch=8),
    "pythia-1.4b": dict(batch=2),
}
RUNS = [
    # (model, mode, ops path, batch override)
    ("130m", "full", "fused", None),
    ("130m", "lora", "fused", None),
    ("1.4b", "full", "fused", None),
    ("1.4b", "lora", "fused", None),
    ("1.4b", "lora", "fused", 2),  # the batch of the paper-setting anchor in DESIGN.md
    ("1.4b", "lora", "fused+recompute", 2),
    ("1.4b", "lora", "fused+bf16-frozen", 2),  # precision.frozen_base: bf16
    ("130m", "full", "fused+graph", None),  # run.cuda_graphs
    ("130m", "full", "fused+compile", None),  # run.compile
    ("mamba2-130m", "full", "fused+compile", None),
    ("130m", "lora", "fused+graph", None),
    ("1.4b", "lora", "fused+graph", 2),
    ("1.4b", "lora", "fused+bf16-frozen+graph", 2),
    ("130m", "full", "reference", None),
    # run.chunked_head_loss (no full logits) and model.checkpoint_blocks: the memory options
    ("130m", "full", "fused+chunked-head", None),
    ("1.4b", "lora", "fused+bf16-frozen+chunked-head", 2),
    ("1.4b", "lora", "fused+bf16-frozen+chunked-head+blocks", 2),
    # Mamba-2 (issue 17's rows: full fine-tuning at 130m, LoRA on every buffer at 1.3B)
    ("mamba2-130m", "full", "fused", None),
    ("mamba2-1.3b", "lora", "fused", 2),
    ("mamba2-1.3b", "lora", "fused+bf16-frozen", 2),
    # ... and as the training loop runs them by default on one GPU (run.cuda_graphs: auto)
    ("mamba2-130m", "full", "fused+graph", None),
    ("mamba2-1.3b", "lora", "fused+graph", 2),
    ("mamba2-1.3b", "lora", "fused+bf16-frozen+graph", 2),
    # Issue 18's hybrid row: mamba-ft with adapters on every buffer (Mamba, attention, MLP)
    ("nemotron_h-1b", "lora", "fused", 2),
    ("nemotron_h-1b", "lora", "fused+bf16-frozen", 2),
    # Baselines in the same run (transformers_baselines.py): plain transformers (+ PEFT), with
    # mamba_ssm's Triton SSD patched into its Mamba-2 mixers (--mamba-ssm-src)
    ("pythia-160m", "full", "transformers", None),
    ("pythia-1.4b", "lora", "transformers", 2),
    # The Pythia baselines through mamba-ft's step (its fp32 chunked loss, PEFT LoRA on every
    # Linear), with and without the chunked head: what run.chunked_head_loss buys a Transformer
    ("pythia-160m", "full", "fused", None),
    ("pythia-160m", "full", "fused+chunked-head", None),
    ("pythia-1.4b", "lora", "fused", 2),
    ("pythia-1.4b", "lora", "fused+chunked-head", 2),
    ("mamba2-130m", "full", "transformers+mamba_ssm", None),
    ("mamba2-1.3b", "lora", "transformers+mamba_ssm", 2),
    ("nemotron_h-1b", "lora", "transformers+mamba_ssm", 2),
]


def build(name: str):
    shape = MODELS[name]
    if shape.get("mamba2"):
        config = transformers_baselines.mamba2_config(shape["hidden_size"],
                                                      shape["num_hidden_layers"])
        return load_model(config, need_tokenizer=False, seed=0).model
    if shape.get("hybrid"):
        return load_model(transformers_baselines.nemotron_h_config(), need_tokenizer=False,
                          seed=0).model
    if name.startswith("pythia"):  # the Transformer baseline through mamba-ft's training step
        return load_model(transformers_baselines.pythia_config(name), need_tokenizer=False,
                          allow_transformers=True, seed=0).model
    config = transformers_baselines.mamba_config(shape["hidden_size"], shape["num_hidden_layers"])
    return load_model(config, need_tokenizer=False, seed=0).model


_ACCELERATOR = None
_SSD_CALLS = None  # mamba_ssm's patched-in SSD calls (--mamba-ssm-src), for the baselines


def _bf16_accelerator():
    """One Accelerator for the process (its state is process-wide), as the loop builds it."""
    from accelerate import Accelerator

    global _ACCELERATOR
    if _ACCELERATOR is None:
        _ACCELERATOR = Accelerator(mixed_precision="bf16")
    return _ACCELERATOR


def make_step(name, mode, path, batch, L):
    """A model, its optimizer and one training step, ready to run: (step, trainable, losses).

    Shared with benchmarks/profile_step.py, so the profile is of exactly this step.
    """
    ops, *options = path.split("+")
    if ops == "transformers":
        return transformers_baselines.make_step(name, mode, batch, L, _bf16_accelerator(),
                                                _SSD_CALLS, checkpointing="blocks" in options)
    os.environ["MAMBA_FT_OPS"] = ops if ops == "reference" else "auto"
    with torch.device("cuda"):  # random init on the GPU: seconds, where the CPU takes a minute
        model = build(name).train()
    if "recompute" in options:
        set_recompute_ssm(model, True)
    if "blocks" in options:  # model.checkpoint_blocks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        from mamba_ft.adapters import AdapterConfig, attach_adapters

        attach_adapters(model, AdapterConfig(targets=["all"], rank=8))
    if "bf16-frozen" in options:
        from mamba_ft.precision import store_frozen_in

        store_frozen_in(model, torch.bfloat16)
    if "compile" in options:  # run.compile, as the training loop applies it
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, 50280, (batch, L), device="cuda")
    n_targets = ids.numel() - ids.shape[0]
    losses = []

    accelerator = _bf16_accelerator()

    def micro_step(batch, scale):
        # The training loop's own micro-step (mamba_ft.training.step): bf16 autocast, the fp32
        # chunked next-token loss, backward.
        return forward_loss_sum(model, batch, accelerator, backward_scale=scale,
                                chunked_head="chunked-head" in options)

    if "graph" in options:
        from mamba_ft.training.cuda_graph import GraphedMicroStep

        run_micro_step = GraphedMicroStep(micro_step, params, ids.device)
    else:
        run_micro_step = micro_step

    def step():
        loss_sum = run_micro_step({"input_ids": ids, "labels": ids}, 1.0 / n_targets)
        opt.step()
        # In place: a graphed step accumulates into the gradient tensors it was captured with.
        opt.zero_grad(set_to_none="graph" not in options)
        losses.append(loss_sum.item() / n_targets)

    return step, trainable, losses


def run(name, mode, path, batch, L, steps, warmup):
    # The previous run's model can still be alive in a reference cycle (adapter hooks): free it
    # before measuring this run's peak, or that peak includes it.
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step, trainable, losses = make_step(name, mode, path, batch, L)
    secs = wall_seconds_per_call(step, steps, warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30
    os.environ["MAMBA_FT_OPS"] = "auto"
    return dict(model=name, mode=mode, ops=path, batch=batch, L=L, steps=steps,
                step_s=secs, tokens_per_s=batch * L / secs, peak_GiB=peak,
                trainable=trainable, last_loss=losses[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(MODELS), default=None,
                   help="run only the rows of these models")
    p.add_argument("--ops", nargs="+", default=None, help="run only the rows with these ops")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--mamba-ssm-src", type=Path, default=None,
                   help="an unpacked mamba_ssm source tree: its Triton SSD for the transformers "
                        "Mamba-2 baselines (without it those rows fail, saying so)")
    args = p.parse_args()
    global _SSD_CALLS
    if args.mamba_ssm_src is not None:
        _SSD_CALLS = transformers_baselines.patch_mamba_ssm_ssd(args.mamba_ssm_src)
    info = gpu_run_info(mamba_ssm=str(args.mamba_ssm_src))
    rows = []
    for name, mode, path, batch in RUNS:
        if ((args.only and name not in args.only) or (args.ops and path not in args.ops)
                or (path == "reference" and args.no_reference)):
            continue
        batch = batch or MODELS[name]["batch"]
        # The reference path runs a Python loop over time: a couple of steps say enough.
        steps, warmup = (2, 1) if path == "reference" else (args.steps, 3)
        try:
            row = run(name, mode, path, batch, args.L, steps, warmup)
        except torch.cuda.OutOfMemoryError:
            row = dict(model=name, mode=mode, ops=path, batch=batch, L=args.L, error="OOM")
            torch.cuda.empty_cache()
        except Exception as exc:  # report it and go on with the other runs
            row = dict(model=name, mode=mode, ops=path, batch=batch, L=args.L,
                       error=f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, "train_throughput", dict(info=info, rows=rows))
    lines = [f"{device_and_versions(info)}; {info['date']}; bf16 autocast, AdamW, L={args.L}, "
             "random init.", ""]
    lines += markdown_table(
        ["model", "mode", "ops", "batch", "tokens/s", "peak GiB", "trainable params"],
        [[r["model"], r["mode"], r["ops"], r["batch"]]
         + ([r["error"], "", ""] if "error" in r else
            [f"{r['tokens_per_s']:,.0f}", f"{r['peak_GiB']:.1f}", f"{r['trainable']:,}"])
         for r in rows])
    print(write_markdown(args.out, "train_throughput", lines))


if __name__ == "__main__":
    main()
