"""A model's answers to examples: teacher-forced argmax, and greedy generation.

- Teacher forcing (Jelassi et al.'s metric): one forward over prompt + reference answer; the
  prediction at each answer position is the argmax given the *reference* tokens before it, so
  one early mistake does not spoil the rest.
- Greedy generation: the model continues the prompt with its own tokens (transformers'
  `generate`, with the KV cache or Mamba's recurrent cache). Examples are batched by prompt
  length, so no row is padded and no recurrent state ever reads a pad token. For recall, where
  given query keys sit between the answers, `closed_loop` feeds back the model's own values
  and the given keys. Where the input never holds an answer (examples with `targets`, Zoology's
  MQAR) the model's outputs cannot change its input, so greedy decoding is teacher forcing.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from mamba_ft.synthetic.base import Example
from mamba_ft.synthetic.vocab import Vocab


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_forced(model, vocab: Vocab, examples: list[Example], batch_size: int = 64) -> list[tuple[str, ...]]:
    device = _device(model)
    out: list[tuple[str, ...]] = [()] * len(examples)
    for idx in _batches_by_length(examples, batch_size, by_mask=False):
        # Same prompt+answer length within a batch: no padding at all.
        ids = torch.tensor([vocab.encode(examples[i].tokens) for i in idx], device=device)
        argmax = model(input_ids=ids).logits.argmax(-1).cpu()
        for row, i in enumerate(idx):
            start = len(examples[i].prompt)
            # logits at position t predict token t+1
            out[i] = tuple(vocab.decode(argmax[row, start - 1: ids.shape[1] - 1]))
    return out


@torch.no_grad()
def greedy(model, vocab: Vocab, examples: list[Example], batch_size: int = 64) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [()] * len(examples)
    fixed_input = [i for i, e in enumerate(examples) if e.targets is not None]
    free = [i for i, e in enumerate(examples) if e.targets is None and e.contiguous_answer]
    interleaved = [i for i, e in enumerate(examples) if e.targets is None and not e.contiguous_answer]
    for group, decode in ((fixed_input, teacher_forced), (free, _generate), (interleaved, closed_loop)):
        for i, pred in zip(group, decode(model, vocab, [examples[i] for i in group], batch_size)):
            out[i] = pred
    return out


def _generate(model, vocab: Vocab, examples: list[Example], batch_size: int) -> list[tuple[str, ...]]:
    device = _device(model)
    out: list[tuple[str, ...]] = [()] * len(examples)
    groups = defaultdict(list)
    for i, e in enumerate(examples):
        groups[len(e.prompt)].append(i)
    for idx_all in groups.values():
        for b in range(0, len(idx_all), batch_size):
            idx = idx_all[b: b + batch_size]
            ids = torch.tensor([vocab.encode(examples[i].prompt) for i in idx], device=device)
            # One token of slack past the longest reference, so an overlong answer shows as one.
            new = max(len(examples[i].answer) for i in idx) + 1
            seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=0, do_sample=False, num_beams=1, eos_token_id=vocab.eos_id,
                                  pad_token_id=vocab.pad_id)
            for row, i in enumerate(idx):
                tokens = vocab.decode(seqs[row, ids.shape[1]:].cpu())
                if vocab.eos in tokens:
                    tokens = tokens[: tokens.index(vocab.eos) + 1]
                out[i] = tuple(tokens)
    return out


@torch.no_grad()
def closed_loop(model, vocab: Vocab, examples: list[Example], batch_size: int = 64) -> list[tuple[str, ...]]:
    """Greedy decoding where unsupervised answer tokens are given and supervised ones are the
    model's own argmax. Computed as a fixed point: start from the reference, replace every
    supervised token by the argmax, repeat until nothing changes. After pass k the first k
    supervised tokens are final, so at most (supervised tokens + 1) passes; a model that is
    right everywhere stops after one."""
    device = _device(model)
    out: list[tuple[str, ...]] = [()] * len(examples)
    for idx in _batches_by_length(examples, batch_size):
        ids = torch.tensor([vocab.encode(examples[i].tokens) for i in idx], device=device)
        start = len(examples[idx[0]].prompt)
        sup = torch.tensor(examples[idx[0]].supervised, device=device)
        positions = start + sup.nonzero().squeeze(-1)  # supervised token positions
        for _ in range(int(sup.sum()) + 1):
            pred = model(input_ids=ids).logits.argmax(-1)[:, positions - 1]
            if torch.equal(pred, ids[:, positions]):
                break
            ids[:, positions] = pred
        for row, i in enumerate(idx):
            out[i] = tuple(vocab.decode(ids[row, start:].cpu()))
    return out


def _batches_by_length(examples: list[Example], batch_size: int, by_mask: bool = True):
    """Index batches whose examples share prompt length, answer length and (`by_mask`, which
    `closed_loop` needs) supervision mask. Without it, examples whose supervised positions
    differ (Zoology's MQAR queries) still share a batch; for every other task the answer
    length fixes the mask, so the batches are the same either way."""
    groups = defaultdict(list)
    for i, e in enumerate(examples):
        groups[(len(e.prompt), e.supervised if by_mask else len(e.answer))].append(i)
    for idx in groups.values():
        for b in range(0, len(idx), batch_size):
            yield idx[b: b + batch_size]
