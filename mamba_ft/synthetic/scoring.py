"""Exact-answer scoring of predicted answers against reference examples.

A prediction is the model's answer tokens, aligned with the reference answer from its first
token: argmax tokens under teacher forcing, or generated tokens (possibly shorter, or cut at
EOS). Only supervised reference positions count, each against `Example.expected` (the answer
token, or the target where the input holds a filler instead).
- exact_match:     every supervised token right (the whole string, EOS included).
- token_accuracy:  the fraction of supervised tokens right, over all examples' tokens.
- answer_accuracy: the final answer (after the task's last marker, e.g. `=` or `<sep>`) right;
                   for CoT tasks this scores the result whatever the chain of thought says.
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
        right = [i < len(pred) and pred[i] == ref
                 for i, (ref, sup) in enumerate(zip(example.expected, example.supervised)) if sup]
        exact += all(right)
        tokens_right += sum(right)
        tokens_total += len(right)
        if example.contiguous_answer:
            answers_right += task.final_answer(pred) == task.final_answer(example.expected)
        else:  # interleaved answers (recall) have no separate final answer: the whole set counts
            answers_right += all(right)
    n = len(examples)
    return {"exact_match": exact / n, "token_accuracy": tokens_right / tokens_total,
            "answer_accuracy": answers_right / n, "examples": n}
