"""Loads a bundled rule task's jsonl splits (lm-eval calls this through `custom_dataset`).

The files sit next to this module, so the tasks work from any working directory and with
`lm_eval --include_path`, with no dataset download and no write to the datasets cache.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_rule_task(rule: str, **_metadata) -> datasets.DatasetDict:
    # lm-eval passes the task's metadata (version, model arguments, ...) as keyword
    # arguments too; only `rule` (from dataset_kwargs) selects anything here.
    splits = {}
    for split in ("train", "validation"):
        path = HERE / f"icl_{rule}.{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
