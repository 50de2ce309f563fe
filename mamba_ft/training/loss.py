"""The training loss: next-token cross-entropy summed over target tokens, in fp32, chunked.

`F.cross_entropy(logits[:, :-1].float(), ...)` copies the (batch, L, vocab) logits to fp32,
keeps an fp32 log-softmax of them for the backward and builds an fp32 gradient before casting
it back: at Mamba-130m, batch 8, L 2048 that is about 10 GB of the step's peak memory and a
tenth of its GPU time. Here the logits stay in their own dtype; rows are upcast a chunk at a
time, the forward keeps one fp32 log-sum-exp per row, and the backward recomputes each
chunk's softmax from it and writes the gradient in the logits' dtype. The values are those
of the fp32 computation (the same fp32 operations, summed in another order).

`head_outside` + `head_loss_sum` go one step further (recipe key `run.chunked_head_loss`): the
model's forward stops before its output head, and the head runs inside the loss a chunk of
rows at a time, recomputed in the backward, so the (batch, L, vocab) logits never exist at
all, in any dtype; only one chunk's logits live at a time. It holds only where the model's
logits are its head applied to the last hidden states, nothing after (`HEAD_ONLY_TYPES`):
Granite-4.0-H divides them by a scaling and Falcon-H1 multiplies them, so those are refused.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mamba_ft.models.model_types import MODEL_TYPES

# Rows per chunk: about 64 M fp32 elements (256 MB) of temporaries at a time.
_CHUNK_ELEMENTS = 64 << 20


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        rows, vocab = logits.shape
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
        total = torch.zeros((), device=logits.device, dtype=torch.float32)
        for start in range(0, rows, chunk):
            block = logits[start:start + chunk].float()
            t = targets[start:start + chunk]
            lse[start:start + chunk] = torch.logsumexp(block, dim=-1)
            picked = block.gather(1, t.clamp(min=0)[:, None])[:, 0]
            total += torch.where(t != ignore_index, lse[start:start + chunk] - picked, 0.0).sum()
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return total

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        chunk = max(1, _CHUNK_ELEMENTS // vocab)
        dlogits = torch.empty_like(logits)
        for start in range(0, rows, chunk):
            t = targets[start:start + chunk]
            # d(lse - logit[target]) / d logits = softmax - one_hot(target), for target rows.
            p = torch.exp(logits[start:start + chunk].float() - lse[start:start + chunk, None])
            p.scatter_add_(1, t.clamp(min=0)[:, None], torch.full_like(p[:, :1], -1.0))
            p *= torch.where(t != ctx.ignore_index, grad, 0.0)[:, None]
            dlogits[start:start + chunk] = p
        return dlogits, None, None


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Sum over positions t with labels[:, t + 1] != ignore_index of -log p(labels[:, t + 1]).

    logits: (batch, L, vocab) in any float dtype; labels: (batch, L). Returns an fp32 scalar.
    """
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
    return _CrossEntropySum.apply(logits.flatten(0, 1), targets.flatten(), ignore_index)


# Model types whose causal LM computes logits = head(last hidden states) and nothing more: the
# Mamba types whose registry entry says so, and the Transformer baselines' GPT-NeoX
# (tests/training/test_loss.py holds each to its own logits path).
HEAD_ONLY_TYPES = tuple(t for t, entry in MODEL_TYPES.items() if entry.head_only_logits) + ("gpt_neox",)


def _head_weight(head: nn.Module) -> torch.Tensor:
    # A PEFT-wrapped head (a Transformer baseline's LoRA) keeps its weight in its base layer.
    return (head.get_base_layer() if hasattr(head, "get_base_layer") else head).weight


class _HeadInput(nn.Module):
    """Stands in for the output head during a forward: keeps the head's input and returns a
    one-column slice of it, so the model's own logits (and any cast of them) cost nothing.
    `weight` is the real head's, which some models read to cast the hidden states."""

    def __init__(self, head: nn.Module):
        super().__init__()
        # Not registered as a submodule: the model's module tree stays what it was.
        object.__setattr__(self, "head", head)
        self.hidden: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return _head_weight(self.head)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden[..., :1]


@contextmanager
def head_outside(model: nn.Module):
    """Within the block the model's forward stops before its output head; the context value's
    `.hidden` is what the head would have read, and `.head` the head itself."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in HEAD_ONLY_TYPES:
        raise ValueError(f"run.chunked_head_loss does not apply to {model_type!r} models")
    head = model.get_output_embeddings()
    stand_in = _HeadInput(head)
    model.set_output_embeddings(stand_in)
    try:
        yield stand_in
    finally:
        model.set_output_embeddings(head)


def _chunk_loss(hidden_rows, targets, head, ignore_index):
    return _CrossEntropySum.apply(head(hidden_rows), targets, ignore_index)


def head_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                  ignore_index: int) -> torch.Tensor:
    """`next_token_loss_sum(head(hidden), labels)` without the full logits: the head runs on a
    chunk of rows at a time and again in the backward (activation checkpointing per chunk).
    hidden: (batch, L, d) as the head would have read it; labels (batch, L)."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
    rows, targets = hidden.flatten(0, 1), targets.flatten()
    chunk = max(1, _CHUNK_ELEMENTS // _head_weight(head).shape[0])
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk):
        # No random numbers in the head (dropout of a LoRA side path aside, whose mask the
        # recompute redraws with the saved RNG state).
        total = total + checkpoint(_chunk_loss, rows[start:start + chunk],
                                   targets[start:start + chunk], head, ignore_index,
                                   use_reentrant=False)
    return total
