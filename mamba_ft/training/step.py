"""One training micro-step, the evaluation loss, and which rows each step reads.

`forward_loss_sum` is the step the loop runs (and `benchmarks/train_throughput.py` times):
forward under the accelerator's autocast, the fp32 next-token loss summed over the targets,
backward scaled by the caller's normaliser. Packed rows run inside `document_starts`, so the
Mamba state restarts at each document.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from mamba_ft import data as data_lib
from mamba_ft.training.loss import head_loss_sum, head_outside, next_token_loss_sum


def micro_batch_indices(step: int, run, steps_per_epoch: int, n_rows: int, world: int, rank: int):
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


def forward_loss_sum(model, batch, accelerator, backward_scale: float | None = None,
                     chunked_head: bool = False):
    """Sum of next-token cross-entropies over the batch's targets (fp32); backward if asked.

    `batch`: input_ids and labels (IGNORE where there is no target), optionally
    attention_mask and document_starts, as `mamba_ft.data.collate` makes them.

    Packed rows run inside `document_starts` (forward and backward) so the Mamba state
    restarts at each document; a hybrid's attention gets position ids restarting there and no
    attention mask, which transformers turns into a block-diagonal mask (padding sits at the
    rows' ends, after every target, so no target sees it).

    `chunked_head` (the recipe's `run.chunked_head_loss`): the output head runs inside the
    loss a chunk of rows at a time, so the full logits never exist (`loss.head_loss_sum`).
    """
    from mamba_ft.models import document_starts, packed_position_ids
    from mamba_ft.models.model_types import is_hybrid

    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    starts = batch.pop("document_starts", None)
    labels = batch.pop("labels")
    inner = accelerator.unwrap_model(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if starts is not None and is_hybrid(inner):
        inputs = {"input_ids": batch["input_ids"], "position_ids": packed_position_ids(starts)}
    boundary = document_starts(inner, starts) if starts is not None else nullcontext()
    with boundary:
        # Accelerate puts this autocast on a prepared model's forward; an FSDP2-sharded model is
        # not prepared, so enter it here (nesting the same autocast changes nothing).
        with accelerator.autocast():
            if chunked_head:
                with head_outside(inner) as stand_in:
                    model(**inputs, use_cache=False)
                # Under the same autocast as the head had inside the forward.
                loss_sum = head_loss_sum(stand_in.hidden, stand_in.head, labels, data_lib.IGNORE)
            else:
                logits = model(**inputs, use_cache=False).logits
        if not chunked_head:
            loss_sum = next_token_loss_sum(logits, labels, data_lib.IGNORE)
        if backward_scale is not None:
            accelerator.backward(loss_sum * backward_scale)
    return loss_sum


@torch.no_grad()
def eval_loss(model, eval_data, run, pad_id, accelerator) -> float:
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
        loss = forward_loss_sum(model, batch, accelerator).double()
        if b < n_batches:
            total[0] += loss
            total[1] += data_lib.count_targets(batch)
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp(min=1))
