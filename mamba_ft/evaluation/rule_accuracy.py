"""A quick in-package few-shot score on the rule corpus (`mamba_ft.rules`): the recipe's
`evaluation.icl_rules` and the bundled models' checks, without lm-eval."""

from __future__ import annotations

import random

from mamba_ft.rules import RULES, few_shot_prompt, make_query


def few_shot_accuracy(model, tokenizer, shots=(0, 1, 3, 5), queries_per_rule: int = 20,
                      seed: int = 1234) -> dict[str, float]:
    """Multiple-choice accuracy per shot count: pick, among the outputs of all rules, the
    continuation ' <output>\\n' with the highest total log-probability. Chance is 1/len(RULES).

    The newline is part of each choice: without it, a rule's output that is a prefix of
    another's (first letter vs copy) would always win on length alone.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rng = random.Random(seed)
    queries = [(rule, *make_query(rng, rule)) for rule in sorted(RULES) for _ in range(queries_per_rule)]
    accuracy = {}
    for k in shots:
        prompt_rng = random.Random(seed + 1 + k)
        correct = 0
        for rule, word, answer, outputs in queries:
            context = tokenizer(few_shot_prompt(prompt_rng, rule, k, word), add_special_tokens=False)["input_ids"]
            choices = sorted(set(outputs.values()))
            rows = [context + tokenizer(f" {c}\n", add_special_tokens=False)["input_ids"] for c in choices]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            scores = []
            for i, r in enumerate(rows):
                positions = torch.arange(len(context) - 1, len(r) - 1, device=device)
                targets = torch.tensor(r[len(context):], device=device)
                scores.append(float(logprobs[i, positions, targets].sum()))
            correct += choices[max(range(len(choices)), key=scores.__getitem__)] == answer
        accuracy[str(k)] = correct / len(queries)
    model.train(was_training)
    return accuracy
