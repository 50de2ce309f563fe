"""The training loop: `mamba-ft train recipe.yaml`, on Accelerate. Read it top to bottom.

1. recipe -> Accelerator (mixed precision, gradient accumulation), output_dir checked (not written)
2. model (+ adapters), precision policy, tokenized data, optimizer
3. optional resume from a checkpoint; the LR schedule from the recipe, at the resumed step;
   only now is output_dir written (mamba_ft/training/run_dir.py)
4. loop: for each optimizer step, fetch this process's micro-batches of the global batch,
   normalise the loss by the number of target tokens in the whole global batch (all
   accumulation steps and all processes), backward (each micro-step eager, or replayed as a
   CUDA graph with run.cuda_graphs), clip, step; log, eval, checkpoint
5. save the adapter (or the model), metrics.jsonl, the loss curve, run evaluation hooks

Data order is a function of (seed, epoch) alone and the position in it a function of the
step, so a resumed run sees exactly the batches the uninterrupted run would have seen, and a
global batch is the same examples however it is split across processes and micro-batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mamba_ft import data as data_lib
from mamba_ft import precision
from mamba_ft.training import distributed, run_dir
from mamba_ft.training import schedule as schedule_lib
from mamba_ft.errors import UserError
from mamba_ft.training.loss import next_token_loss_sum
from mamba_ft.recipe import Recipe, load_recipe

@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    step_losses: list[float]
    initial_eval_loss: float | None = None
    final_eval_loss: float | None = None
    skipped_steps: int = 0
    saved_to: Path | None = None  # adapter or model directory
    metrics_path: Path | None = None
    plot_path: Path | None = None
    evaluation: dict = field(default_factory=dict)


def train_from_recipe(recipe_path: str, overrides: list[str] | None = None) -> TrainResult:
    """What `mamba-ft train` runs: load and validate the recipe, train, say where things are."""
    recipe = load_recipe(recipe_path, overrides)
    result = train(recipe)
    if _is_main():
        print(f"\ntrained {result.steps} steps; eval loss {_fmt(result.initial_eval_loss)} -> "
              f"{_fmt(result.final_eval_loss)}")
        print(f"  output dir: {result.output_dir}")
        for label, path in (("saved", result.saved_to), ("metrics", result.metrics_path),
                            ("loss curve", result.plot_path)):
            if path is not None:
                print(f"  {label}: {path}")
    return result


def train(recipe: Recipe, *, model=None, tokenizer=None, train_dataset=None, eval_dataset=None) -> TrainResult:
    """Train as the recipe says. Pre-built datasets (columns input_ids, labels) skip data loading."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradScalerKwargs, set_seed

    run, cfg_log = recipe.run, recipe.logging
    # -- 1. accelerator and output dir ---------------------------------------------------------
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    trackers = _trackers(cfg_log)
    # Accelerate keeps its settings in process-wide singletons; a second train() call in the
    # same process (tests, sweeps) may ask for another precision, so start them afresh. The
    # process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # FSDP2 launches: mamba-ft shards the model itself (mamba_ft/training/distributed.py says why), so
    # Accelerate is built as for a plain multi-process launch. FSDP1 and DeepSpeed are refused here.
    fsdp2 = distributed.fsdp2_from_launch()
    if fsdp2 is not None:
        distributed.check_fsdp2_recipe(recipe)
    with distributed.plain_multiprocess_accelerate() if fsdp2 is not None else nullcontext():
        accelerator = Accelerator(
            mixed_precision=precision.mixed_precision_for(recipe.precision.mode, torch.device(device_type)),
            gradient_accumulation_steps=run.grad_accum_steps,
            log_with=trackers or None,
            project_dir=run.output_dir,
            cpu=device_type == "cpu",  # also makes a multi-process launch without GPUs use gloo
            kwargs_handlers=[GradScalerKwargs(init_scale=recipe.precision.fp16_init_scale)],
        )
    _check_distributed(accelerator)
    _check_cuda_graphs(recipe, accelerator)
    precision.set_tf32(recipe.precision.tf32)
    out = Path(run.output_dir)
    resume_from = run_dir.check_output_dir(recipe, out)
    set_seed(run.seed)

    # -- 2. model, adapters, data, optimizer ---------------------------------------------------
    if model is None:
        from mamba_ft.models import load_model

        loaded = load_model(recipe.model.source, tokenizer=recipe.model.tokenizer,
                            need_tokenizer=tokenizer is None or train_dataset is None,
                            allow_transformers=recipe.model.kind != "mamba",
                            seed=recipe.model.init_seed if recipe.model.init_seed is not None else run.seed)
        model, is_mamba = loaded.model, loaded.is_mamba
        tokenizer = tokenizer or loaded.tokenizer
        if recipe.model.kind == "transformer" and is_mamba:
            raise UserError(f"model.kind is 'transformer' but {recipe.model.source} is a Mamba; "
                            f"set model.kind: mamba (or auto).")
    else:
        from mamba_ft.models import mixers

        is_mamba = bool(mixers(model))
        if tokenizer is None and train_dataset is None:
            tokenizer = _recipe_tokenizer(recipe)
    if recipe.model.recompute_ssm:
        if not is_mamba:
            raise UserError("model.recompute_ssm applies to Mamba mixers only; this model is a "
                            "Transformer. Set model.recompute_ssm: false.")
        from mamba_ft.models import set_recompute_ssm

        set_recompute_ssm(model, True)
    if recipe.data.packing and not is_mamba:
        raise UserError("data.packing is only supported for Mamba models (their state restarts at "
                        "document starts); a Transformer baseline would attend across documents. "
                        "Set data.packing: false.")

    adapter_report = None
    if recipe.adapter is not None:
        from mamba_ft.adapters import attach_adapters

        adapter_report = attach_adapters(model, recipe.adapter)
        if _is_main():
            print(adapter_report.format())
    precision.enforce_fp32(model)
    if recipe.adapter is not None and recipe.adapter.frozen_dtype != "float32":
        precision.store_frozen_in(model, getattr(torch, recipe.adapter.frozen_dtype))
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("Nothing to train: no parameter requires a gradient.")
    full_shapes = distributed.full_shapes(model)  # to check what is saved from shards
    if fsdp2 is not None:
        model = distributed.shard_model(model, fsdp2, accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # the shards, under FSDP2

    train_data, eval_data = _datasets(recipe, tokenizer, train_dataset, eval_dataset, accelerator)
    pad_id = _pad_id(tokenizer)
    world = accelerator.num_processes
    global_batch = run.micro_batch_size * run.grad_accum_steps * world
    steps_per_epoch = len(train_data) // global_batch
    if steps_per_epoch == 0:
        raise UserError(f"The training data has {len(train_data)} rows, fewer than one global batch "
                        f"({global_batch} = micro_batch_size x grad_accum_steps x processes); "
                        f"add data or lower run.micro_batch_size / run.grad_accum_steps.")
    total_steps = run.max_steps or max(1, int(run.epochs * steps_per_epoch))

    optimizer = torch.optim.AdamW(trainable, lr=recipe.optim.lr, betas=recipe.optim.betas,
                                  eps=recipe.optim.eps, weight_decay=recipe.optim.weight_decay)
    if fsdp2 is None:
        model, optimizer = accelerator.prepare(model, optimizer)
        # Preparing wraps the forward in autocast and casts its outputs to fp32: a full fp32
        # copy of the logits (of the Transformer baselines; transformers' MambaForCausalLM
        # returns fp32 logits itself), which the loss (mamba_ft.training.loss) avoids making. The
        # autocast is entered around every forward below, so the wrapper is dropped.
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    else:  # already sharded; Accelerate must not wrap it in DDP
        optimizer = accelerator.prepare(optimizer)

    # -- 3. resume, schedule, output dir --------------------------------------------------------
    step, step_losses, skipped = 0, [], precision.SkippedSteps()
    schedule_now = schedule_lib.describe(recipe, total_steps)
    if resume_from is not None:
        # The groups then carry every key a saved state has (initial_lr included), which
        # FSDP2's name-keyed load requires; build() below sets the recipe's values again.
        schedule_lib.set_hyperparameters(optimizer, recipe.optim)
        state = _load_checkpoint(resume_from, model, optimizer, accelerator)
        step, step_losses, skipped.count = state["step"], list(state["step_losses"]), state["skipped_steps"]
        if _is_main():
            print(schedule_lib.resume_line(resume_from, step, state.get("schedule"), schedule_now))
    # Not prepared: it steps once per optimizer step, whatever the process count. A skipped
    # fp16 step does not advance it, so its position is the number of applied steps.
    scheduler = schedule_lib.build(optimizer, recipe, total_steps, position=step - skipped.count)
    run_dir.claim_output_dir(recipe, out, resume_from, accelerator)
    metrics = _Metrics(out / "metrics.jsonl", accelerator, keep_through=step, fresh=resume_from is None)
    if trackers:
        accelerator.init_trackers(cfg_log.wandb_project or "mamba-ft", config=recipe.model_dump(mode="json"))

    # -- 4. loop ----------------------------------------------------------------------------------
    def evaluate() -> float | None:
        if eval_data is None:
            return None
        loss = _eval_loss(model, eval_data, run, pad_id, accelerator)
        metrics.write({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}, trackers)
        return loss

    initial_eval = evaluate() if resume_from is None else metrics.first_eval()
    progress = _progress(cfg_log, total_steps, step, accelerator)
    checked_adapter_grads = adapter_report is None or resume_from is not None
    graphed, batch_length = None, None
    if run.cuda_graphs:
        from mamba_ft.training.cuda_graph import GraphedMicroStep

        # Replayed micro-steps have fixed shapes: every micro-batch is padded to max_length.
        graphed = GraphedMicroStep(
            lambda batch, scale: _forward_loss_sum(model, batch, accelerator, backward_scale=scale),
            trainable, accelerator.device)
        batch_length = recipe.data.max_length
    model.train()
    while step < total_steps:
        started = time.perf_counter()
        batches = [data_lib.collate(train_data[idx], pad_id, batch_length)
                   for idx in _micro_batch_indices(step, run, steps_per_epoch, len(train_data),
                                                   world, accelerator.process_index)]
        # Loss normaliser: target tokens of the whole global batch (all accumulation steps and
        # processes). Each micro-batch contributes sum(token losses) / n_global, scaled by
        # grad_accum_steps (accelerator.backward divides by it) and by the process count (DDP
        # averages gradients over processes), so the update is the per-token mean over the
        # global batch however it is split.
        local_targets = sum(data_lib.count_targets(b) for b in batches)
        n_global = int(accelerator.reduce(torch.tensor(local_targets, device=accelerator.device), "sum"))
        scale = run.grad_accum_steps * world / max(n_global, 1)
        loss_sum = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for batch in batches:
            with accelerator.accumulate(model):
                if graphed is not None:
                    token_loss_sum = graphed(batch, scale)
                else:
                    token_loss_sum = _forward_loss_sum(model, batch, accelerator, backward_scale=scale)
                loss_sum += token_loss_sum.detach()
                if not checked_adapter_grads:
                    from mamba_ft.adapters import check_adapter_gradients

                    check_adapter_gradients(accelerator.unwrap_model(model))
                    checked_adapter_grads = True
                if accelerator.sync_gradients:
                    if recipe.optim.max_grad_norm is not None:
                        grad_norm = float(accelerator.clip_grad_norm_(trainable, recipe.optim.max_grad_norm))
                    optimizer.step()
                    # The graph accumulates into the gradient tensors it was captured with.
                    optimizer.zero_grad(set_to_none=graphed is None)
        step_loss = float(accelerator.reduce(loss_sum, "sum")) / max(n_global, 1)
        step_skipped = skipped.update(accelerator)  # fp16 overflow: not applied, not a failure
        for what, value in (("loss", step_loss), ("gradient norm", None if step_skipped else grad_norm)):
            if value is not None and not math.isfinite(value):
                raise run_dir.nonfinite_stop(out, step + 1, what, value, accelerator)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        if not step_skipped:
            scheduler.step()
        step += 1
        step_losses.append(step_loss)
        if accelerator.is_main_process:  # this finite step vouches for the checkpoint before it
            run_dir.prune_checkpoints(out, run.keep_last, trusted_through=step - 1)

        tokens = int(accelerator.reduce(torch.tensor(sum(int(b["attention_mask"].sum()) for b in batches),
                                                     device=accelerator.device), "sum"))
        tokens_per_s = tokens / max(time.perf_counter() - started, 1e-9)
        if step % cfg_log.every == 0 or step == total_steps:
            metrics.write({"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": round(tokens_per_s, 1), "peak_memory_mb": _peak_memory_mb(),
                           "skipped_steps": skipped.count}, trackers)
        if progress is not None:
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            progress.update(1)
        if run.eval_every and step % run.eval_every == 0 and step < total_steps:
            evaluate()
            model.train()
        if run.save_every and step % run.save_every == 0:
            _save_checkpoint(out, step, step_losses, skipped.count, model, optimizer, schedule_now, accelerator)
    if progress is not None:
        progress.close()
    if accelerator.is_main_process:  # the run finished: its last checkpoint counts toward keep_last
        run_dir.prune_checkpoints(out, run.keep_last, trusted_through=step)
    del graphed  # its memory pool (the step's activations) is freed with it

    # -- 5. final eval, save, plot, hooks ---------------------------------------------------------
    final_eval = evaluate()
    result = TrainResult(output_dir=out, steps=step, step_losses=step_losses, initial_eval_loss=initial_eval,
                         final_eval_loss=final_eval, skipped_steps=skipped.count, metrics_path=metrics.path)
    # keep_fp32_wrapper=False: hand back a plain module, without the autocast wrapper on forward.
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    # Under FSDP2 every process gathers the full parameters, so the main process saves and
    # evaluates with the single-device code (and the saved tensors are checked to be whole).
    full_state = (distributed.full_state_dict(unwrapped, accelerator.is_main_process)
                  if run.save_final and recipe.adapter is None and distributed.is_sharded(unwrapped) else None)
    with distributed.gathered(unwrapped):
        if _is_main():
            if run.save_final:
                result.saved_to = _save_final(recipe, unwrapped, tokenizer, out, full_state)
                if distributed.is_sharded(unwrapped):
                    distributed.check_saved(result.saved_to, full_shapes, adapter=recipe.adapter is not None)
            if cfg_log.plot:
                result.plot_path = _plot(metrics.path, out / "loss.png")
            if recipe.evaluation.icl_rules is not None:
                result.evaluation["icl_rules"] = _icl_rules_eval(recipe.evaluation.icl_rules, unwrapped, tokenizer, out)
            if recipe.evaluation.icl_sweep is not None:
                result.evaluation["icl_sweep"] = _icl_sweep(recipe, unwrapped, tokenizer, out)
        accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()
    return result


# --- setup helpers -------------------------------------------------------------------------------

def _check_distributed(accelerator) -> None:
    """Refuse the launches mamba-ft cannot yet run correctly, before anything is loaded."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        # Only reached when Accelerate's own FSDP path is active (an FSDP plugin passed in code):
        # FSDP2 launches are sharded by mamba-ft itself (distributed.fsdp2_from_launch).
        raise UserError("Accelerate's own FSDP path is not supported; launch with "
                        "accelerate launch --config_file configs/accelerate/fsdp2.yaml (mamba-ft shards "
                        "the model itself) or configs/accelerate/ddp.yaml.")
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU,
                                            DistributedType.MULTI_CPU):
        raise UserError(f"Accelerate's {accelerator.distributed_type.value} launch is not supported; "
                        f"use configs/accelerate/ddp.yaml or configs/accelerate/fsdp2.yaml "
                        f"(or no launcher on one device).")


def _check_cuda_graphs(recipe: Recipe, accelerator) -> None:
    if not recipe.run.cuda_graphs:
        return
    if accelerator.device.type != "cuda":
        raise UserError("run.cuda_graphs needs a CUDA GPU and this run is on the CPU; set "
                        "run.cuda_graphs: false.")
    if accelerator.num_processes > 1:
        raise UserError(f"run.cuda_graphs runs on one GPU and this launch has "
                        f"{accelerator.num_processes} processes; launch without accelerate's "
                        f"multi-process configs, or set run.cuda_graphs: false.")


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _trackers(cfg_log) -> list[str]:
    trackers = []
    if cfg_log.tensorboard:
        trackers.append("tensorboard")
    if cfg_log.wandb_project:
        trackers.append("wandb")
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in trackers:
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"logging asks for {name} but the {module} package is not installed; "
                                f"pip install {module}, or turn it off in the recipe.") from None
    return trackers


def _datasets(recipe, tokenizer, train_dataset, eval_dataset, accelerator):
    """Tokenized train/eval datasets: given ones as they are, else built from data section."""
    if train_dataset is not None:
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if ds is not None and not {"input_ids", "labels"} <= set(ds.column_names):
                raise UserError(f"{name} must have columns input_ids and labels; found "
                                f"{', '.join(ds.column_names)}.")
        return train_dataset, eval_dataset
    # The main process tokenizes first; the others then read datasets' cache.
    with accelerator.main_process_first():
        built = {}
        for what, source in (("train", recipe.data.train), ("eval", recipe.data.eval)):
            if source is None:
                built[what] = None
                continue
            tokenized = data_lib.tokenize_rows(data_lib.load_rows(source, what), recipe.data, tokenizer, what)
            if accelerator.is_main_process and (tokenized.n_truncated or tokenized.n_dropped):
                print(f"{what}: {tokenized.n_truncated} of {tokenized.n_examples} examples truncated to "
                      f"{recipe.data.max_length} tokens, {tokenized.n_dropped} dropped (no target left)")
            built[what] = tokenized.dataset
    return built["train"], built["eval"]


def _recipe_tokenizer(recipe: Recipe):
    """The tokenizer a recipe names (model.tokenizer, else beside model.source)."""
    from mamba_ft.models import load_tokenizer, resolve_source

    where = recipe.model.tokenizer or recipe.model.source
    if not isinstance(where, str):
        raise UserError("The data must be tokenized but the recipe names no tokenizer; set model.tokenizer.")
    return load_tokenizer(resolve_source(where), where)


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _micro_batch_indices(step: int, run, steps_per_epoch: int, n_rows: int, world: int, rank: int):
    """This process's micro-batches (row indices) for optimizer step `step` (0-based).

    The global batch of a step is a fixed slice of the epoch's permutation; accumulation step
    a, process p take consecutive micro-batch-sized pieces of it, so 1 process x micro 4 and
    2 processes x micro 2 see the same examples in each step.
    """
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(run.seed + epoch)).tolist()
    micro = run.micro_batch_size
    base = within * micro * run.grad_accum_steps * world
    return [order[base + (a * world + rank) * micro: base + (a * world + rank + 1) * micro]
            for a in range(run.grad_accum_steps)]


# --- forward, loss, eval -------------------------------------------------------------------------

def _forward_loss_sum(model, batch, accelerator, backward_scale: float | None = None):
    """Sum of next-token cross-entropies over the batch's targets (fp32); backward if asked.

    Packed rows run inside `document_starts` (forward and backward) so the Mamba state
    restarts at each document.
    """
    from mamba_ft.models import document_starts

    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    starts = batch.pop("document_starts", None)
    labels = batch.pop("labels")
    boundary = document_starts(accelerator.unwrap_model(model), starts) if starts is not None else nullcontext()
    with boundary:
        # Accelerate puts this autocast on a prepared model's forward; an FSDP2-sharded model is
        # not prepared, so enter it here (nesting the same autocast changes nothing).
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss_sum = next_token_loss_sum(logits, labels, data_lib.IGNORE)
        if backward_scale is not None:
            accelerator.backward(loss_sum * backward_scale)
    return loss_sum


@torch.no_grad()
def _eval_loss(model, eval_data, run, pad_id, accelerator) -> float:
    """Mean per-token loss over the eval set (or its first eval_batches micro-batches)."""
    model.eval()
    micro, world, rank = run.micro_batch_size, accelerator.num_processes, accelerator.process_index
    n_batches = math.ceil(len(eval_data) / micro)
    if run.eval_batches is not None:
        n_batches = min(n_batches, run.eval_batches)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    # Every process runs the same number of forwards (FSDP2 all-gathers inside each one); one
    # left without a batch of its own repeats batch 0 and does not count it.
    for first in range(0, n_batches, world):
        b = first + rank
        start = (b if b < n_batches else 0) * micro
        batch = data_lib.collate(eval_data[start: start + micro], pad_id)
        loss = _forward_loss_sum(model, batch, accelerator).double()
        if b < n_batches:
            total[0] += loss
            total[1] += data_lib.count_targets(batch)
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))


# --- metrics, progress, plot ---------------------------------------------------------------------

class _Metrics:
    """metrics.jsonl: one JSON row per logged step (train) or eval, written by the main process."""

    def __init__(self, path: Path, accelerator, keep_through: int, fresh: bool):
        self.path, self.accelerator = path, accelerator
        if accelerator.is_main_process:
            rows = [] if fresh or not path.exists() else [json.loads(line) for line in path.read_text().splitlines() if line]
            # On resume, rows written after the checkpoint's step belong to the lost future.
            rows = [r for r in rows if r["step"] <= keep_through]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict, trackers) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def first_eval(self) -> float | None:
        if not self.path.exists():
            return None
        for line in self.path.read_text().splitlines():
            row = json.loads(line)
            if "eval_loss" in row:
                return row["eval_loss"]
        return None


def _progress(cfg_log, total_steps: int, step: int, accelerator):
    if not (cfg_log.progress_bar and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _plot(metrics_path: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# --- checkpoints and final save ------------------------------------------------------------------

def _save_checkpoint(out, step, step_losses, skipped, model, optimizer, schedule, accelerator):
    """Write checkpoints/step-N atomically (temporary dir, then rename); run_dir prunes them.

    `schedule` (schedule.describe) is recorded so a resumed run can say what it changed; the
    scheduler itself is rebuilt from the recipe on resume, so its state is not saved.
    """
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    # Every process takes part in gathering (FSDP2 shards); the main one writes.
    unwrapped, main = accelerator.unwrap_model(model), accelerator.is_main_process
    trainable = distributed.trainable_state(unwrapped, main)
    optimizer_state = distributed.optimizer_state(unwrapped, optimizer, main)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of our own interrupted save
        tmp.mkdir(parents=True)
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state,
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None},
                   tmp / "optimizer.pt")
    accelerator.wait_for_everyone()
    # Every process saves its own RNG states (dropout, anything random in the forward).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain tensors and tuples only, so loading needs no pickled code (weights_only=True).
    torch.save({"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "step_losses": step_losses, "skipped_steps": skipped,
             "num_processes": accelerator.num_processes, "layout": distributed.layout(unwrapped),
             "schedule": schedule}))
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, model, optimizer, accelerator) -> dict:
    """Restore weights, optimizer moments, loss scale and RNG; the checkpoint's trainer_state.

    The scheduler state an older checkpoint holds is not used: the schedule comes from the
    recipe (mamba_ft/training/schedule.py).
    """
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise UserError(f"Checkpoint {path} was written by {state['num_processes']} processes and this "
                        f"run has {accelerator.num_processes}; resume with the same number of processes.")
    unwrapped = accelerator.unwrap_model(model)
    written_by, this_run = state.get("layout", "replicated"), distributed.layout(unwrapped)
    if written_by != this_run:
        raise UserError(f"Checkpoint {path} was written by a {written_by} launch and this run is "
                        f"{this_run} (FSDP2 vs DDP / one device); resume with the launch config that wrote it.")
    distributed.load_trainable_state(unwrapped, load_file(str(path / "trainable.safetensors")))
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    distributed.load_optimizer_state(unwrapped, optimizer, saved["optimizer"])
    if accelerator.scaler and saved["scaler"]:
        accelerator.scaler.load_state_dict(saved["scaler"])
    rng = torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True)
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _save_final(recipe: Recipe, model, tokenizer, out: Path, state_dict: dict | None = None) -> Path:
    """The adapter (PEFT-style dir) or, for full training, the whole model with its tokenizer.

    `state_dict`: the gathered full state of an FSDP2 model (its own state_dict() holds shards).
    """
    if recipe.adapter is not None:
        from mamba_ft.adapters import merge_adapters, save_adapters

        target = out / "adapter"
        save_adapters(model, target, base_model=str(recipe.model.source))
        if recipe.run.merge_at_end:
            merge_adapters(model)
            model.save_pretrained(out / "merged")
            if tokenizer is not None:
                tokenizer.save_pretrained(out / "merged")
        return target
    target = out / "model"
    model.save_pretrained(target, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


def _icl_rules_eval(cfg, model, tokenizer, out: Path) -> dict:
    from mamba_ft.evaluation.rule_accuracy import few_shot_accuracy

    accuracy = few_shot_accuracy(model, tokenizer, shots=cfg.shots, queries_per_rule=cfg.queries_per_rule,
                                 seed=cfg.seed)
    (out / "icl_rules.json").write_text(json.dumps(accuracy, indent=2))
    print("icl_rules few-shot accuracy (chance 1/6): " + ", ".join(f"{k}-shot {v:.2f}" for k, v in accuracy.items()))
    return accuracy


def _icl_sweep(recipe: Recipe, model, tokenizer, out: Path) -> dict:
    from mamba_ft.evaluation.sweep import run_after_training

    source = recipe.model.source
    # A model trained from a bare config has no "before" checkpoint worth scoring.
    from_config = isinstance(source, dict) or str(source).endswith((".json", ".yaml", ".yml"))
    sweep = run_after_training(recipe.evaluation.icl_sweep, model, tokenizer,
                               None if from_config else str(source), out / "icl")
    return {"gains": sweep.gains, "ratios": sweep.ratios}
