"""Multi-GPU scaling of mamba-ft training: tokens/s on 1 and N GPUs, peak memory per GPU, DDP vs FSDP2.

The model is built from a config in the shape of Mamba-1.4B (d_model 2048, 48 layers, vocab
50280; random init, no downloads), with LoRA on all targets (rank 8, as in
benchmarks/train_throughput.py), fp32 parameters, bf16 autocast, AdamW, L 2048. Each process
trains on its own random token ids, `--batch` sequences per GPU (weak scaling: the global batch
grows with the GPUs). One step: forward, backward, gradient all-reduce (DDP) or reduce-scatter
(FSDP2), AdamW.

Runs, each a fresh `torchrun` launch: 1 GPU; DDP on --gpus GPUs (torch DDP, what Accelerate
wraps the model in); FSDP2 on --gpus GPUs (mamba_ft.training.distributed.shard_model, what
`mamba-ft train` does under configs/accelerate/fsdp2.yaml). DDP scaling efficiency is
tokens/s on N GPUs / (N x tokens/s on 1 GPU).

    python benchmarks/distributed.py [--gpus 2] [--batch 2] [--L 2048] [--steps 10] [--out DIR]
    python benchmarks/distributed.py --cpu-dry-run --out /tmp/dist-bench   # gloo, tiny model

Writes distributed.json and distributed.md under --out (default benchmarks/results); a run that
fails, times out (--timeout per launch, --budget for all) or finds no time left becomes a row with
its error, and the other runs go on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from mamba_ft.training.distributed import run_launcher

from bench_common import (RESULTS_DIR, gpu_run_info, markdown_table, wall_seconds_per_call, write_json,
                          write_markdown)

SHAPES = {
    "1.4b": dict(hidden_size=2048, num_hidden_layers=48, vocab_size=50280),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab_size=256),  # the CPU dry run
}


# --- one process of one run ------------------------------------------------------------------

def _build(shape: str, device: torch.device):
    from mamba_ft.models import load_model

    config = dict(model_type="mamba", state_size=16, expand=2, conv_kernel=4, use_cache=False, **SHAPES[shape])
    try:  # initialise on the GPU: a 1.4B random init on the CPU takes far longer
        with device:
            return load_model(config, need_tokenizer=False, seed=0).model
    except Exception as exc:
        print(f"init on {device} failed ({type(exc).__name__}: {exc}); initialising on the CPU", flush=True)
        return load_model(config, need_tokenizer=False, seed=0).model


def worker(args) -> None:
    import torch.distributed as dist

    on_cuda = not args.cpu_dry_run
    dist.init_process_group("nccl" if on_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if on_cuda else torch.device("cpu")
    # The model (and DDP's reducer) must be gone before the process group is: a DDP module
    # destroyed after destroy_process_group was seen to hang a gloo rank at exit.
    row = _measure(args, rank, world, local, device, on_cuda)
    gc.collect()
    rows = [None] * world
    dist.all_gather_object(rows, row)
    dist.destroy_process_group()
    if rank == 0:
        Path(args.json).write_text(json.dumps(rows))


def _measure(args, rank: int, world: int, local: int, device: torch.device, on_cuda: bool) -> dict:
    """Build the model for this run's kind, time its steps; this process's row."""
    import torch.distributed as dist

    from mamba_ft.training import distributed as mft_dist
    from mamba_ft.adapters import AdapterConfig, attach_adapters

    t0 = time.perf_counter()
    model = _build(args.shape, device)
    attach_adapters(model, AdapterConfig(targets=["all"], rank=8))
    model.to(device).train()
    if args.worker == "fsdp2":
        model = mft_dist.shard_model(model, mft_dist.Fsdp2Settings(), device)
    elif args.worker == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if on_cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.L), generator=torch.Generator().manual_seed(rank)).to(device)
    setup_s = time.perf_counter() - t0
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also a sync point, as a logging loop would have

    for _ in range(args.warmup):  # Triton compiles here
        step()
    if on_cuda:  # the peak is of the timed steps, not of the warm-up's compiling
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def synchronize():  # every process starts the clock together, and stops it with the slowest
        if on_cuda:
            torch.cuda.synchronize()
        dist.barrier()

    step_s = wall_seconds_per_call(step, args.steps, warmup=0, synchronize=synchronize)
    if on_cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return dict(rank=rank, world=world, step_s=step_s, peak_GiB=peak, setup_s=setup_s, last_loss=losses[-1],
                trainable=sum(p.numel() for p in params))  # a DTensor reports its global size


# --- the runs, the tables ----------------------------------------------------------------------

def launch(kind: str, nproc: int, args, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--worker", kind, "--json", str(result), "--shape", args.shape,
               "--batch", str(args.batch), "--L", str(args.L), "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--cpu-dry-run"] if args.cpu_dry_run else [])
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        started = time.perf_counter()
        base = dict(run=kind, gpus=nproc, batch_per_gpu=args.batch, L=args.L)
        if timeout < 20:
            return dict(base, error="not run: time budget spent")
        code, out, err, timed_out = run_launcher(cmd, env, timeout)
        wall = time.perf_counter() - started
        if timed_out:
            return dict(base, error=f"timed out after {timeout:.0f} s", log=out[-1000:] + err[-2000:])
        if code != 0 or not result.exists():
            return dict(base, error=f"exit {code}", log=out[-1000:] + err[-3000:])
        rows = json.loads(result.read_text())
    step_s = max(r["step_s"] for r in rows)  # the step ends when the slowest process ends it
    return dict(base, step_s=step_s, tokens_per_s=nproc * args.batch * args.L / step_s,
                peak_GiB_per_gpu=max(r["peak_GiB"] for r in rows), setup_s=max(r["setup_s"] for r in rows),
                launch_wall_s=wall, last_loss=rows[0]["last_loss"], trainable=rows[0]["trainable"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="sequences per GPU")
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=150, help="seconds per launch at most")
    p.add_argument("--budget", type=float, default=600, help="seconds for all launches together")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--cpu-dry-run", action="store_true", help="gloo, a tiny model: check the script")
    p.add_argument("--shape", choices=list(SHAPES), default=None)
    p.add_argument("--worker", choices=["single", "ddp", "fsdp2"], help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.cpu_dry_run else "1.4b")
    if args.worker:
        return worker(args)

    info = gpu_run_info(
        device="CPU (dry run, gloo)" if args.cpu_dry_run else None,
        gpus_visible=0 if args.cpu_dry_run else torch.cuda.device_count(),
        nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        shape=args.shape, batch_per_gpu=args.batch, L=args.L, steps=args.steps,
        lora="all targets, rank 8", precision="fp32 params, bf16 autocast",
        env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                            "NVSHMEM_DISABLE_NVLS")})
    rows = []
    deadline = time.monotonic() + args.budget
    for kind, nproc in (("single", 1), ("ddp", args.gpus), ("fsdp2", args.gpus)):
        row = launch(kind, nproc, args, min(args.timeout, deadline - time.monotonic()))
        rows.append(row)
        print({k: v for k, v in row.items() if k != "log"}, flush=True)
        if "log" in row:
            print(row["log"], flush=True)
    single = next((r for r in rows if r["run"] == "single" and "error" not in r), None)
    for r in rows:
        if single and "error" not in r and r["run"] != "single":
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["gpus"] * single["tokens_per_s"])
    write_json(args.out, "distributed", dict(info=info, rows=rows))
    print(write_markdown(args.out, "distributed", _markdown(info, rows)))


def _markdown(info: dict, rows: list[dict]) -> list[str]:
    lines = [f"Device: {info['device']} x {info['gpus_visible']}; torch {info['torch']}, Triton {info['triton']}, "
             f"NCCL {info['nccl']}; {info['date']}. Mamba-{info['shape']} shape, random init, LoRA "
             f"{info['lora']}, {info['precision']}, AdamW, L={info['L']}, {info['batch_per_gpu']} sequences "
             f"per GPU, {info['steps']} timed steps.", ""]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["run"], r["gpus"], r["error"], "", "", ""])
            continue
        eff = f"{100 * r['scaling_efficiency']:.1f}%" if "scaling_efficiency" in r else "(baseline)"
        table.append([r["run"], r["gpus"], f"{r['tokens_per_s']:,.0f}", eff, f"{r['step_s']:.3f}",
                      f"{r['peak_GiB_per_gpu']:.1f}"])
    return lines + markdown_table(["run", "GPUs", "tokens/s", "scaling efficiency", "step s",
                                   "peak GiB per GPU"], table)


if __name__ == "__main__":
    main()
