"""Datasets -> tokenized, masked, optionally packed batches.

A recipe's data section names where rows come from (a local file or directory, a hub name,
or the generated in-context-rules corpus) and their format:

- `text`: a `text` column; every token is a target.
- `completion`: `prompt` and `completion`; loss on the completion only.
- `alpaca`: `instruction`, optional `input`, `output`; loss on the output only.
- `chat`: `messages` (role/content dicts) rendered with the tokenizer's chat template; loss on
  the assistant turns only.

Each example becomes `input_ids` and `labels` (-100 = not a target), truncated to max_length
(truncations are counted). With packing, examples are concatenated greedily into rows of at
most max_length tokens and each row carries `document_starts` (1 where a document begins); the
trainer runs the model inside `mamba_ft.models.document_starts` so the recurrent and conv
state restart there. The first token of a packed document is never a target, exactly as when
the document is a row of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mamba_ft.errors import UserError

IGNORE = -100
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
FORMAT_COLUMNS = {
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
}
_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass
class TokenizedData:
    dataset: object  # datasets.Dataset with input_ids, labels (and document_starts when packed)
    n_examples: int
    n_truncated: int
    n_dropped: int  # examples with no target token left after truncation


def resolve_data_path(path: str) -> Path | str:
    """`bundled:NAME` -> the file shipped in the package; a local path; else a hub name."""
    if path.startswith("bundled:"):
        local = BUNDLED_DIR / path.split(":", 1)[1]
        if not local.exists():
            raise UserError(f"There is no bundled data file {path!r} (looked in {BUNDLED_DIR}).")
        return local
    local = Path(path).expanduser()
    if local.exists():
        return local
    if local.suffix in _LOADERS or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"Data file {path!r} does not exist; fix data.*.path in the recipe "
                        f"(relative paths are relative to the directory you run from).")
    return path


def load_rows(source, what: str):
    """The raw rows of one data source (recipe `DataSource`) as a `datasets.Dataset`."""
    import datasets

    if source.icl_rules is not None:
        from mamba_ft.rules import make_corpus

        gen = source.icl_rules
        texts = make_corpus(gen.seed, gen.n_documents, (gen.min_demos, gen.max_demos),
                            gen.substitution_fraction)
        rows = datasets.Dataset.from_dict({"text": texts})
    else:
        where = resolve_data_path(source.path)
        try:
            if isinstance(where, Path) and where.is_dir():
                loaded = datasets.load_from_disk(str(where))
                rows = loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
            elif isinstance(where, Path):
                if where.stat().st_size == 0:
                    raise UserError(f"The {what} data file {where} is empty; point data.{what}.path "
                                    f"at a file with rows.")
                builder = _LOADERS.get(where.suffix)
                if builder is None:
                    raise UserError(f"Data file {where} has an unknown type; use one of "
                                    f"{', '.join(_LOADERS)} or a directory saved by datasets.")
                rows = datasets.load_dataset(builder, data_files=str(where), split="train")
            else:
                rows = datasets.load_dataset(where, split=source.split)
        except (FileNotFoundError, KeyError, ValueError, StopIteration,
                datasets.exceptions.DatasetGenerationError) as exc:
            bad = _first_bad_json_line(where) if isinstance(where, Path) and where.suffix == ".jsonl" else None
            if bad is not None:
                raise UserError(f"The {what} data file {where}, line {bad[0]}, is not a JSON object "
                                f"({bad[1]}); fix that line (each line of a .jsonl file is one JSON "
                                f"object).") from None
            raise UserError(f"Could not load the {what} data from {source.path!r}: {exc}") from None
    if source.limit is not None:
        rows = rows.select(range(min(source.limit, len(rows))))
    return rows


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line number, reason) of the first line of a .jsonl file that is not a JSON object."""
    import json

    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError as exc:
                return number, exc.msg
            if not isinstance(parsed, dict):
                return number, f"found a {type(parsed).__name__}"
    return None


def check_columns(rows, fmt: str, what: str) -> None:
    expected = FORMAT_COLUMNS[fmt]
    missing = [c for c in expected if c not in rows.column_names]
    if missing:
        raise UserError(f"The {what} data does not fit format {fmt!r}: expected columns "
                        f"{', '.join(expected)}, found {', '.join(rows.column_names) or 'none'}; "
                        f"rename the columns or set data.format to the format they follow.")


def _check_text_fields(row: dict, fmt: str, where: str) -> None:
    """A null or non-string text field names its row and field (the tokenizer's error would not)."""
    for column in FORMAT_COLUMNS[fmt]:
        value = row[column]
        if column != "messages" and not isinstance(value, str):
            shown = "null" if value is None else f"a {type(value).__name__} ({value!r:.40})"
            raise UserError(f"{where}: field {column!r} is {shown}, not text; fix or remove that row "
                            f"(data.{{train,eval}}.limit keeps only the first rows).")


def segments(row: dict, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """The example as (text, is_target) pieces, in order."""
    if fmt == "text":
        return [(row["text"], True)]
    if fmt == "completion":
        return [(row["prompt"], False), (row["completion"], True)]
    if fmt == "alpaca":
        extra = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(instruction=row["instruction"],
                                      input_block=f"### Input:\n{extra}\n\n" if extra else "")
        return [(prompt, False), (row["output"], True)]
    # chat: render growing prefixes so each assistant turn is exactly the text it adds.
    messages, pieces, done = row["messages"], [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not before.startswith(done) or not through.startswith(before):
            raise UserError("The tokenizer's chat template does not render conversations "
                            "incrementally; use data.format: completion instead.")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return pieces


def tokenize_example(pieces, tokenizer, max_length: int, add_eos: bool, train_on_prompt: bool):
    """input_ids and labels for one example, and whether it was truncated."""
    input_ids, labels = [], []
    for text, is_target in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if (is_target or train_on_prompt) else [IGNORE] * len(ids)
    if add_eos and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


def tokenize_rows(rows, data_cfg, tokenizer, what: str) -> TokenizedData:
    """Format, tokenize, mask, truncate and (optionally) pack one split."""
    if len(rows) == 0:
        raise UserError(f"The {what} data is empty; point data.{what}.path at a file with rows.")
    check_columns(rows, data_cfg.format, what)
    if data_cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.format is 'chat' but the tokenizer has no chat template; use a "
                        "tokenizer with one (model.tokenizer) or data.format: completion.")

    source = getattr(data_cfg, what).path if what in ("train", "eval") else None
    origin = f"The {what} data" + (f" ({source})" if source else "")

    def encode(row, index):
        _check_text_fields(row, data_cfg.format, f"{origin}, row {index + 1}")
        ids, labels, truncated = tokenize_example(segments(row, data_cfg.format, tokenizer), tokenizer,
                                                  data_cfg.max_length, data_cfg.add_eos,
                                                  data_cfg.train_on_prompt)
        # The first token is never predicted (nothing comes before it).
        n_targets = sum(1 for label in labels[1:] if label != IGNORE)
        return {"input_ids": ids, "labels": labels, "truncated": truncated, "n_targets": n_targets}

    encoded = rows.map(encode, with_indices=True, remove_columns=rows.column_names, desc=f"tokenizing {what}")
    n_truncated = sum(encoded["truncated"])
    kept = encoded.filter(lambda n: n > 0, input_columns="n_targets")
    n_dropped = len(encoded) - len(kept)
    if len(kept) == 0:
        raise UserError(f"No {what} example has a target token left after truncation to "
                        f"data.max_length={data_cfg.max_length}; raise max_length or check that "
                        f"the responses are not empty.")
    kept = kept.remove_columns(["truncated", "n_targets"])
    if data_cfg.packing:
        kept = pack(kept, data_cfg.max_length)
    return TokenizedData(kept, len(encoded), n_truncated, n_dropped)


def pack(dataset, max_length: int):
    """Concatenate examples greedily (in order) into rows of at most max_length tokens."""
    import datasets

    rows = {"input_ids": [], "labels": [], "document_starts": []}
    row = {key: [] for key in rows}
    for example_ids, example_labels in zip(dataset["input_ids"], dataset["labels"]):
        if row["input_ids"] and len(row["input_ids"]) + len(example_ids) > max_length:
            for key in rows:
                rows[key].append(row[key])
            row = {key: [] for key in rows}
        row["input_ids"] += example_ids
        # A document's first token is not predicted from the previous document.
        row["labels"] += [IGNORE] + list(example_labels[1:])
        row["document_starts"] += [1] + [0] * (len(example_ids) - 1)
    for key in rows:
        rows[key].append(row[key])
    return datasets.Dataset.from_dict(rows)


def collate(columns: dict[str, list], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples (as `dataset[indices]` gives them: a dict of columns) into a batch;
    pads are masked and never targets. `length`: pad to it (fixed shapes) instead of to the
    longest example."""
    examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
    longest = max(len(e["input_ids"]) for e in examples)
    if length is not None and longest > length:
        raise UserError(f"An example has {longest} tokens, more than the fixed batch length {length} "
                        f"(data.max_length); truncate the data to data.max_length tokens.")
    length = length or longest
    batch = {
        "input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
    }
    packed = "document_starts" in examples[0]
    if packed:
        batch["document_starts"] = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n] = torch.as_tensor(e["input_ids"])
        batch["labels"][i, :n] = torch.as_tensor(e["labels"])
        batch["attention_mask"][i, :n] = 1
        if packed:
            batch["document_starts"][i, :n] = torch.as_tensor(e["document_starts"], dtype=torch.bool)
    return batch


def count_targets(batch: dict) -> int:
    """Number of predicted tokens in a batch (labels shift by one: position 0 is never one)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
