"""Tools behind the bundled tiny models (docs/bundled-models.md): the tokenizer trained on
the rule corpus, the quickstart's data files, and a quick few-shot score of any model.

    python -m mamba_ft.bundled_models tokenizer OUT_DIR
    python -m mamba_ft.bundled_models quickstart-data OUT_DIR
    python -m mamba_ft.bundled_models score bundled:tiny-mamba
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mamba_ft.evaluation.rule_accuracy import few_shot_accuracy
from mamba_ft.models import load_model
from mamba_ft.rules import HELD_OUT_RULES, completion_rows, make_corpus


def train_tokenizer(out_dir, seed: int = 0, n_documents: int = 20000, vocab_size: int = 512):
    """Byte-level BPE for this corpus, saved as a transformers PreTrainedTokenizerFast.

    Lowercase letters and whitespace are pre-split into single characters, so every letter is
    its own token (rules such as reverse and sort act on letters) and tokenization is stable
    at the space that starts an answer: tokens(context) + tokens(' ' + output) equals
    tokens(context + ' ' + output), which few-shot scoring relies on. Merges happen only in
    the remaining runs of characters ('Q:', 'A:', punctuation, capitals, digits).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[a-z]|\s"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    extra = ["### Instruction:\n", "### Input:\n", "### Response:\n", "Apply the rule to the word.",
             "The quick brown fox, 0123456789!"]
    tok.train_from_iterator(make_corpus(seed, n_documents) + extra, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special[0], pad_token=special[1],
                                      bos_token=special[0], unk_token=None)
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mamba_ft.bundled_models",
                                     description="tools behind the bundled tiny models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer and save it")
    p.add_argument("out_dir")
    p = sub.add_parser("quickstart-data", help="write the quickstart's rotate-rule jsonl files")
    p.add_argument("out_dir")
    p = sub.add_parser("score", help="few-shot multiple-choice accuracy of a model")
    p.add_argument("model", help="model dir or bundled:NAME")
    p.add_argument("--shots", default="0,1,3,5")
    p.add_argument("--queries-per-rule", type=int, default=50)
    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        print(f"vocab size {len(train_tokenizer(args.out_dir))}, saved to {args.out_dir}")
    elif args.command == "quickstart-data":
        rng = random.Random(0)
        for split, n in (("train", 512), ("eval", 64)):
            path = Path(args.out_dir) / f"rotate-{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = completion_rows(rng, HELD_OUT_RULES["rotate"], n)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            print(f"{len(rows)} rows -> {path}")
    else:
        loaded = load_model(args.model, allow_transformers=True)
        shots = [int(s) for s in args.shots.split(",")]
        print(few_shot_accuracy(loaded.model, loaded.tokenizer, shots, args.queries_per_rule))


if __name__ == "__main__":
    main()
