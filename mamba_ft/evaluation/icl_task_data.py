"""Write the bundled in-context rule tasks: one lm-eval task (YAML + jsonl) per rule.

Run `python -m mamba_ft.evaluation.icl_task_data` to regenerate `mamba_ft/evaluation/tasks/
icl_rules/`; the output depends only on the fixed seed below and on
`mamba_ft.rules`, so the committed files are exactly what this script writes
(a test checks that).

Each task `icl_<rule>` is few-shot multiple choice. A document is a query word; its choices
are the outputs of *every* rule on that word (the query is drawn so they all differ), and the
gold choice is the output of the task's rule. The few-shot examples are demonstrations of the
same rule, drawn from the task's `train` split, so with 0 shots a model can only guess the rule
and with k shots it can infer it: the score rises with k exactly as far as the model learns in
context.

The prompt reproduces the training text of `icl_rules` byte for byte: demonstrations are
`Q: <input> A: <output>\\n` lines with nothing between them, and every choice carries the line's
final newline. The newline matters: without it the first-letter answer " a" would be a prefix
of the copy answer " abc", so its summed log-likelihood could never be lower, and the copy
task could never be answered right.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mamba_ft.rules import RULES, make_query

TASKS_DIR = Path(__file__).resolve().parent / "tasks" / "icl_rules"
TAG = "mamba_ft_icl"
SEED = 20261123
SPLIT_SIZES = {"train": 64, "validation": 100}  # train: the few-shot pool; validation: scored

YAML_TEMPLATE = """\
# Written by `python -m mamba_ft.evaluation.icl_task_data`; edit that script, not this file.
task: icl_{rule}
tag: {tag}
custom_dataset: !function data.load_rule_task
dataset_kwargs:
  rule: {rule}
output_type: multiple_choice
training_split: train
validation_split: validation
fewshot_split: train
doc_to_text: "Q: {{{{query}}}} A:"
doc_to_target: label
doc_to_choice: choices
target_delimiter: " "
fewshot_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  icl_metric: acc
"""


def task_name(rule: str) -> str:
    return f"icl_{rule}"


def rule_rows(rule: str, split: str, count: int) -> list[dict]:
    # A string seed is hashed deterministically (random.seed version 2), so every
    # (rule, split) gets its own reproducible stream; train and validation never share one.
    rng = random.Random(f"{SEED}/{rule}/{split}")
    rows = []
    for _ in range(count):
        word, _, outputs = make_query(rng, rule)
        rule_names = list(RULES)
        rows.append({
            "query": word,
            "choices": [outputs[name] + "\n" for name in rule_names],
            "label": rule_names.index(rule),
            "rule": rule,
        })
    return rows


def write_tasks(out_dir: Path = TASKS_DIR) -> list[Path]:
    """Write every rule task's YAML and jsonl splits into `out_dir`; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rule in RULES:
        yaml_path = out_dir / f"{task_name(rule)}.yaml"
        yaml_path.write_text(YAML_TEMPLATE.format(rule=rule, tag=TAG))
        written.append(yaml_path)
        for split, count in SPLIT_SIZES.items():
            path = out_dir / f"{task_name(rule)}.{split}.jsonl"
            lines = [json.dumps(row, sort_keys=True) for row in rule_rows(rule, split, count)]
            path.write_text("\n".join(lines) + "\n")
            written.append(path)
    return written


if __name__ == "__main__":
    for path in write_tasks():
        print(path)
