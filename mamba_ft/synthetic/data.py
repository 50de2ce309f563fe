"""Seeded train and test sets of a task, with no test prompt seen in training, as datasets.

Every draw comes from `random.Random` seeded with a string naming (seed, split, length), so the
same seed gives the same examples on any machine and Python version, and adding a test length
never changes the examples at another length. Rows are `input_ids` and `labels` (-100 where no
loss is taken: the prompt, and answer tokens that are given rather than predicted).
"""

from __future__ import annotations

import random

from datasets import Dataset

from mamba_ft.synthetic.base import Example, Task

IGNORE_INDEX = -100


def train_examples(task: Task, min_length: int, max_length: int, count: int, seed: int) -> list[Example]:
    """`count` examples with lengths uniform in [min_length, max_length]."""
    task.check_length(min_length, "The shortest training length")
    task.check_length(max_length, "The longest training length")
    rng = random.Random(f"{seed}:train:{task.name}")
    return [task.sample(rng, rng.randint(min_length, max_length)) for _ in range(count)]


def test_examples(task: Task, length: int, count: int, seed: int,
                  exclude: set[tuple[str, ...]]) -> list[Example]:
    """Up to `count` distinct examples of one length whose prompt is not in `exclude`.

    Short lengths over small alphabets have fewer distinct prompts than asked for; then the set
    is smaller (the caller reports its size) rather than repeating or leaking training prompts.
    """
    task.check_length(length, "The test length")
    rng = random.Random(f"{seed}:test:{task.name}:{length}")
    out, seen = [], set(exclude)
    misses = 0
    while len(out) < count and misses < 20 * count + 100:
        example = task.sample(rng, length)
        if example.prompt in seen:
            misses += 1
            continue
        seen.add(example.prompt)
        out.append(example)
    return out


def prompts(examples: list[Example]) -> set[tuple[str, ...]]:
    return {e.prompt for e in examples}


def encode_example(task: Task, example: Example) -> dict[str, list[int]]:
    vocab = task.vocab
    input_ids = vocab.encode(example.tokens)
    labels = [IGNORE_INDEX] * len(example.prompt) + [
        token if supervised else IGNORE_INDEX
        for token, supervised in zip(vocab.encode(example.expected), example.supervised)
    ]
    return {"input_ids": input_ids, "labels": labels}


def to_dataset(task: Task, examples: list[Example]) -> Dataset:
    rows = [encode_example(task, e) for e in examples]
    return Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                              "labels": [r["labels"] for r in rows]})
