"""Exact-answer scoring of predicted answers against reference examples.

A prediction is the model's answer tokens, aligned with the reference answer from its first
token: argmax tokens under teacher forcing, or generated tokens (possibly shorter, or cut at
EOS). Only supervised reference positions count, each against `Example.expected` (the answer
token, or the target where the input holds a filler instead).
- exact_match:     every supervised token right (the whole string, EOS included).
- token_accuracy:  the fraction of supervised tokens right, over all examples' tokens.
- answer_accuracy: the final answer (after the task's last marker, e.g. `=` or `<sep>`) right;
                   for CoT tasks this scores the result whatever the chain of thought says.
                   Where given tokens interleave the answer, it is read at the reference's
                   positions after its last marker.
"""

from __future__ import annotations

from mamba_ft.synthetic.base import Example, Task


def score(task: Task, examples: list[Example], predictions: list) -> dict[str, float]:
    if len(examples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        return {"exact_match": float("nan"), "token_accuracy": float("nan"),
                "answer_accuracy": float("nan"), "examples": 0}
    exact = tokens_right = tokens_total = answers_right = 0
    for example, pred in zip(examples, predictions):
        pred = tuple(pred)
        checked = {i: i < len(pred) and pred[i] == ref
                   for i, (ref, sup) in enumerate(zip(example.expected, example.supervised)) if sup}
        right = list(checked.values())
        exact += all(right)
        tokens_right += sum(right)
        tokens_total += len(right)
        if example.contiguous_answer:
            answers_right += task.final_answer(pred) == task.final_answer(example.expected)
        else:
            # Given tokens sit between the predicted ones (recall's query keys, a DP trace's
            # inputs), and a teacher-forced prediction holds anything there, so the final answer
            # is read at the reference's positions: every supervised one after its last marker
            # (recall has no marker: the whole set of values counts).
            start = _after_last_marker(task, example.expected)
            answers_right += all(ok for i, ok in checked.items() if i >= start)
    n = len(examples)
    return {"exact_match": exact / n, "token_accuracy": tokens_right / tokens_total,
            "answer_accuracy": answers_right / n, "examples": n}


def _after_last_marker(task: Task, tokens) -> int:
    if task.final_marker is None or task.final_marker not in tokens:
        return 0
    return len(tokens) - tokens[::-1].index(task.final_marker)
