"""`mamba-ft train recipe.yaml`, on Accelerate: one run read top to bottom, in four phases.

1. setup: the Accelerator (mixed precision, accumulation, the launch checked), the output dir
   checked (not written), the model with its adapters and precision policy, the tokenized data,
   the optimizer.
2. resume: from a checkpoint when there is one; the LR schedule built from the recipe at the
   resumed step; only now is the output dir written (run_dir.py).
3. train: for each optimizer step, this process's micro-batches of the global batch; the loss
   normalised by the target tokens of the whole global batch (all accumulation steps and all
   processes); each micro-step eager, compiled (run.compile) or replayed as a CUDA graph
   (run.cuda_graphs, decided in setup: graph_decision.py); clip, step; log, eval, checkpoint.
4. finish: final eval, the adapter (or model) saved, the loss curve, the evaluation hooks.

Data order is a function of (seed, epoch) alone and the position in it a function of the
step, so a resumed run sees exactly the batches the uninterrupted run would have seen, and a
global batch is the same examples however it is split across processes and micro-batches.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from mamba_ft import data as data_lib
from mamba_ft import precision
from mamba_ft.errors import UserError
from mamba_ft.models import mixers
from mamba_ft.recipe import Recipe, load_recipe
from mamba_ft.training import checkpoints, distributed, finish, metrics, run_dir, setup, step
from mamba_ft.training.finish import TrainResult
from mamba_ft.training.graph_decision import decide_cuda_graphs
from mamba_ft.training import schedule as schedule_lib


def train_from_recipe(recipe_path: str, overrides: list[str] | None = None) -> TrainResult:
    """What `mamba-ft train` runs: load and validate the recipe, train, say where things are."""
    result = train(load_recipe(recipe_path, overrides))
    if _is_main():
        print(result.summary())
    return result


def train(recipe: Recipe, *, model=None, tokenizer=None, train_dataset=None, eval_dataset=None) -> TrainResult:
    """Train as the recipe says. Pre-built datasets (columns input_ids, labels) skip data loading."""
    run = TrainingRun(recipe)
    run.setup(model, tokenizer, train_dataset, eval_dataset)
    run.resume()
    if run.step >= run.total_steps:  # resumed from the run's own last step
        return run.already_finished()
    try:
        run.train()
    except KeyboardInterrupt:
        run.say_how_to_resume()
        raise
    return run.finish()


class TrainingRun:
    """The state one run carries from phase to phase."""

    def __init__(self, recipe: Recipe):
        self.recipe, self.out = recipe, Path(recipe.run.output_dir)

    # -- 1. setup --------------------------------------------------------------------------------
    def setup(self, model, tokenizer, train_dataset, eval_dataset) -> None:
        recipe, run = self.recipe, self.recipe.run
        self.trackers = metrics.trackers(recipe.logging)
        # FSDP2 launches: mamba-ft shards the model itself (distributed.py says why), so
        # Accelerate is built as for a plain multi-process launch. FSDP1 and DeepSpeed are refused.
        self.fsdp2 = distributed.fsdp2_from_launch()
        if self.fsdp2 is not None:
            distributed.check_fsdp2_recipe(recipe)
        self.accelerator = accelerator = setup.build_accelerator(recipe, self.trackers, self.fsdp2)
        setup.check_distributed(accelerator)
        setup.check_cuda_graphs(recipe, accelerator)
        setup.check_chunked_head_loss(recipe, accelerator, self.fsdp2)
        precision.set_tf32(recipe.precision_policy().tf32)
        self.resume_from = run_dir.check_output_dir(recipe, self.out)
        from accelerate.utils import set_seed

        set_seed(run.seed)

        model, tokenizer, self.adapter_report = setup.build_model(recipe, model, tokenizer, train_dataset)
        self.tokenizer = tokenizer
        self.full_shapes = distributed.full_shapes(model)  # to check what is saved from shards
        self.graphs = decide_cuda_graphs(
            recipe, device=accelerator.device, num_processes=accelerator.num_processes,
            sharded=self.fsdp2 is not None, has_mixers=bool(mixers(model)),
            model_type=getattr(getattr(model, "config", None), "model_type", None),
            data_passed_in=train_dataset is not None)
        if accelerator.is_main_process:
            print(self.graphs.line())
        if self.fsdp2 is not None:
            model = distributed.shard_model(model, self.fsdp2, accelerator.device)
        if run.compile:
            # In place (the module, its names and state dict stay as they are): the forward and,
            # through AOTAutograd, the backward become compiled graphs on the first micro-step.
            model.compile()
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # the shards, under FSDP2

        self.train_data, self.eval_data = setup.datasets(recipe, tokenizer, train_dataset, eval_dataset,
                                                         accelerator)
        self.pad_id = setup.pad_id(tokenizer)
        self.world = accelerator.num_processes
        global_batch = run.micro_batch_size * run.grad_accum_steps * self.world
        self.steps_per_epoch = len(self.train_data) // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"The training data has {len(self.train_data)} rows, fewer than one global "
                            f"batch ({global_batch} = micro_batch_size x grad_accum_steps x processes); "
                            f"add data or lower run.micro_batch_size / run.grad_accum_steps.")
        self.total_steps = run.max_steps or max(1, int(run.epochs * self.steps_per_epoch))

        optimizer = torch.optim.AdamW(self.trainable, lr=recipe.optim.lr, betas=recipe.optim.betas,
                                      eps=recipe.optim.eps, weight_decay=recipe.optim.weight_decay)
        if self.fsdp2 is None:
            model, optimizer = accelerator.prepare(model, optimizer)
            # Preparing wraps the forward in autocast and casts its outputs to fp32: a full fp32
            # copy of the logits (of the Transformer baselines; transformers' MambaForCausalLM
            # returns fp32 logits itself), which the loss (training/loss.py) avoids making. The
            # autocast is entered around every forward (step.py), so the wrapper is dropped.
            accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        else:  # already sharded; Accelerate must not wrap it in DDP
            optimizer = accelerator.prepare(optimizer)
        self.model, self.optimizer = model, optimizer

    # -- 2. resume, schedule, output dir ----------------------------------------------------------
    def resume(self) -> None:
        recipe, accelerator = self.recipe, self.accelerator
        self.step, self.step_losses, self.skipped = 0, [], precision.SkippedSteps()
        self.schedule_now = schedule_lib.describe(recipe, self.total_steps)
        if self.resume_from is not None:
            # The groups then carry every key a saved state has (initial_lr included), which
            # FSDP2's name-keyed load requires; build() below sets the recipe's values again.
            schedule_lib.set_hyperparameters(self.optimizer, recipe.optim)
            state = checkpoints.load_checkpoint(self.resume_from, self.model, self.optimizer, accelerator)
            self.step, self.step_losses = state["step"], list(state["step_losses"])
            self.skipped.count = state["skipped_steps"]
            if accelerator.is_main_process:
                print(schedule_lib.resume_line(self.resume_from, self.step, state.get("schedule"),
                                               self.schedule_now))
        # Not prepared: it steps once per optimizer step, whatever the process count. A skipped
        # fp16 step does not advance it, so its position is the number of applied steps.
        self.scheduler = schedule_lib.build(self.optimizer, recipe, self.total_steps,
                                            position=self.step - self.skipped.count)
        run_dir.claim_output_dir(recipe, self.out, self.resume_from, accelerator,
                                 resolved=(self.graphs.line(),))
        self.metrics = metrics.Metrics(self.out / "metrics.jsonl", accelerator, keep_through=self.step,
                                       fresh=self.resume_from is None)
        if self.trackers:
            accelerator.init_trackers(recipe.logging.wandb_project or "mamba-ft",
                                      config=recipe.model_dump(mode="json"))

    # -- 3. train ----------------------------------------------------------------------------------
    def train(self) -> None:
        recipe, run, accelerator, model = self.recipe, self.recipe.run, self.accelerator, self.model
        self.initial_eval = self.evaluate() if self.resume_from is None else self.metrics.first_eval()
        progress = metrics.progress(recipe.logging, self.total_steps, self.step, accelerator)
        checked_adapter_grads = self.adapter_report is None or self.resume_from is not None
        graphed, batch_length = None, None
        if self.graphs.on:
            from mamba_ft.training.cuda_graph import GraphedMicroStep

            # Replayed micro-steps have fixed shapes: every micro-batch is padded to max_length.
            graphed = GraphedMicroStep(
                lambda batch, scale: step.forward_loss_sum(model, batch, accelerator, backward_scale=scale),
                self.trainable, accelerator.device)
            batch_length = recipe.data.max_length
        model.train()
        while self.step < self.total_steps:
            started = time.perf_counter()
            batches = [data_lib.collate(self.train_data[idx], self.pad_id, batch_length)
                       for idx in step.micro_batch_indices(self.step, run, self.steps_per_epoch,
                                                           len(self.train_data), self.world,
                                                           accelerator.process_index)]
            # Loss normaliser: target tokens of the whole global batch (all accumulation steps
            # and processes). Each micro-batch contributes sum(token losses) / n_global, scaled
            # by grad_accum_steps (accelerator.backward divides by it) and by the process count
            # (DDP averages gradients over processes), so the update is the per-token mean over
            # the global batch however it is split.
            local_targets = sum(data_lib.count_targets(b) for b in batches)
            n_global = int(accelerator.reduce(torch.tensor(local_targets, device=accelerator.device), "sum"))
            scale = run.grad_accum_steps * self.world / max(n_global, 1)
            loss_sum = torch.zeros((), device=accelerator.device)
            grad_norm = None
            for batch in batches:
                with accelerator.accumulate(model):
                    if graphed is not None:
                        token_loss_sum = graphed(batch, scale)
                    else:
                        token_loss_sum = step.forward_loss_sum(
                            model, batch, accelerator, backward_scale=scale,
                            chunked_head=run.chunked_head_loss)
                    loss_sum += token_loss_sum.detach()
                    if not checked_adapter_grads:
                        from mamba_ft.adapters import check_adapter_gradients

                        check_adapter_gradients(accelerator.unwrap_model(model))
                        checked_adapter_grads = True
                    if accelerator.sync_gradients:
                        if recipe.optim.max_grad_norm is not None:
                            grad_norm = float(accelerator.clip_grad_norm_(self.trainable, recipe.optim.max_grad_norm))
                        self.optimizer.step()
                        # The graph accumulates into the gradient tensors it was captured with.
                        self.optimizer.zero_grad(set_to_none=graphed is None)
            step_loss = float(accelerator.reduce(loss_sum, "sum")) / max(n_global, 1)
            step_skipped = self.skipped.update(accelerator)  # fp16 overflow: not applied, not a failure
            for what, value in (("loss", step_loss), ("gradient norm", None if step_skipped else grad_norm)):
                if value is not None and not math.isfinite(value):
                    raise run_dir.nonfinite_stop(self.out, self.step + 1, what, value, accelerator)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step used
            if not step_skipped:
                self.scheduler.step()
            self.step += 1
            self.step_losses.append(step_loss)
            if accelerator.is_main_process:  # this finite step vouches for the checkpoint before it
                run_dir.prune_checkpoints(self.out, run.keep_last, trusted_through=self.step - 1)
            self.metrics.log_step(self.step, self.total_steps, recipe.logging.every, batches, started,
                                  {"loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                                   "skipped_steps": self.skipped.count}, self.trackers, progress)
            if run.eval_every and self.step % run.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
                model.train()
            if run.save_every and self.step % run.save_every == 0:
                checkpoints.save_checkpoint(self.out, self.step, self.step_losses, self.skipped.count, model,
                                            self.optimizer, self.schedule_now, accelerator)
        if progress is not None:
            progress.close()
        if accelerator.is_main_process:  # the run finished: its last checkpoint counts toward keep_last
            run_dir.prune_checkpoints(self.out, run.keep_last, trusted_through=self.step)
        del graphed  # its memory pool (the step's activations) is freed with it

    def evaluate(self) -> float | None:
        if self.eval_data is None:
            return None
        loss = step.eval_loss(self.model, self.eval_data, self.recipe.run, self.pad_id, self.accelerator)
        self.metrics.write({"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))},
                           self.trackers)
        return loss

    def already_finished(self) -> TrainResult:
        """A resumed run whose checkpoint is its last step: evaluating and saving again would
        only append duplicate rows and rewrite the same files, so nothing runs."""
        outputs = [self.out / name for name in ("adapter", "model") if (self.out / name).is_dir()]
        return TrainResult(output_dir=self.out, steps=self.step, step_losses=self.step_losses,
                           initial_eval_loss=self.metrics.first_eval(), skipped_steps=self.skipped.count,
                           saved_to=outputs[0] if outputs else None, metrics_path=self.metrics.path,
                           already_finished=True, cuda_graphs=self.graphs.on)

    def say_how_to_resume(self) -> None:
        if self.accelerator.is_main_process:
            print(f"\n{run_dir.interrupted_message(self.out, self.step, self.total_steps)}", flush=True)

    # -- 4. finish: final eval, save, plot, hooks ---------------------------------------------------
    def finish(self) -> TrainResult:
        recipe, run, accelerator = self.recipe, self.recipe.run, self.accelerator
        result = TrainResult(output_dir=self.out, steps=self.step, step_losses=self.step_losses,
                             initial_eval_loss=self.initial_eval, final_eval_loss=self.evaluate(),
                             skipped_steps=self.skipped.count, metrics_path=self.metrics.path,
                             cuda_graphs=self.graphs.on)
        # keep_fp32_wrapper=False: hand back a plain module, without the autocast wrapper on forward.
        unwrapped = accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        # Under FSDP2 every process gathers the full parameters, so the main process saves and
        # evaluates with the single-device code (and the saved tensors are checked to be whole).
        sharded = distributed.is_sharded(unwrapped)
        full_state = (distributed.full_state_dict(unwrapped, accelerator.is_main_process)
                      if run.save_final and recipe.adapter is None and sharded else None)
        with distributed.gathered(unwrapped):
            if accelerator.is_main_process:
                if run.save_final:
                    result.saved_to = finish.save_final(recipe, unwrapped, self.tokenizer, self.out, full_state)
                    if sharded:
                        distributed.check_saved(result.saved_to, self.full_shapes, adapter=recipe.adapter is not None)
                if recipe.logging.plot:
                    result.plot_path = metrics.plot_losses(self.metrics.path, self.out / "loss.png")
                result.evaluation = finish.run_evaluation_hooks(recipe, unwrapped, self.tokenizer, self.out)
            accelerator.wait_for_everyone()
        if self.trackers:
            accelerator.end_training()
        return result


def _is_main() -> bool:
    # After train(): the process state Accelerate set up for this launch.
    from accelerate import PartialState

    return PartialState().is_main_process
