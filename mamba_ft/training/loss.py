"""The training loss: next-token cross-entropy summed over target tokens, in fp32, chunked.

`F.cross_entropy(logits[:, :-1].float(), ...)` copies the (batch, L, vocab) logits to fp32,
keeps an fp32 log-softmax of them for the backward and builds an fp32 gradient before casting
it back: at Mamba-130m, batch 8, L 2048 that is about 10 GB of the step's peak memory and a
tenth of its GPU time. Here the logits stay in their own dtype; rows are upcast a chunk at a
time, the forward keeps one fp32 log-sum-exp per row, and the backward recomputes each
chunk's softmax from it and writes the gradient in the logits' dtype. The values are those
of the fp32 computation (the same fp32 operations, summed in another order).
"""

from __future__ import annotations

import torch

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
