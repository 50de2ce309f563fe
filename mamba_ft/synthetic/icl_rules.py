"""In-context rule learning: text whose rule is given only by examples in the prompt.

Each document picks one hidden rule and writes demonstration lines in exactly this format::

    Q: <input> A: <output>\n

Inputs are short random lowercase words (3-6 letters). A model can only predict the outputs
of a document by inferring its rule from the lines before, so on a held-out query its
accuracy sits near chance with 0 demonstrations and rises with k: the behaviour the bundled
tiny models are trained to show, and the one the ICL benchmark measures.

Optionally a document also draws a random letter substitution (a permutation of a-z) that
is applied to every output; it makes the rule harder to guess from one line.

Everything takes a `random.Random`, so a seed fixes the corpus.
"""

from __future__ import annotations

import random
import string
from typing import Callable

LETTERS = string.ascii_lowercase
MIN_LEN, MAX_LEN = 3, 6

RULES: dict[str, Callable[[str], str]] = {
    "copy": lambda word: word,
    "reverse": lambda word: word[::-1],
    "first_letter": lambda word: word[0],
    "last_letter": lambda word: word[-1],
    "sort_letters": lambda word: "".join(sorted(word)),
    "drop_first": lambda word: word[1:],
}

# A rule the pretraining corpus never shows: the quickstart fine-tunes the tiny models on it.
HELD_OUT_RULES: dict[str, Callable[[str], str]] = {
    "rotate": lambda word: word[1:] + word[0],
}


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def random_substitution(rng: random.Random) -> dict[str, str]:
    """A random permutation of the alphabet, as a letter -> letter mapping."""
    shuffled = list(LETTERS)
    rng.shuffle(shuffled)
    return dict(zip(LETTERS, shuffled))


def demo_line(word: str, output: str) -> str:
    """One demonstration: 'Q: <input> A: <output>\\n'."""
    return f"Q: {word} A: {output}\n"


def query_prompt(word: str) -> str:
    """The prompt for a query, ending just before the answer: 'Q: <input> A:'.

    The answer to score or generate is ' ' + output (a space, then the letters), followed by
    the newline that ends every line.
    """
    return f"Q: {word} A:"


def apply_rule(rule: str, word: str, substitution: dict[str, str] | None = None) -> str:
    if rule not in RULES:
        raise KeyError(f"unknown rule {rule!r}; rules are {', '.join(RULES)}")
    output = RULES[rule](word)
    if substitution:
        output = "".join(substitution[c] for c in output)
    return output


def make_document(rng: random.Random, rule: str | None = None, n_demos: int | tuple[int, int] = (4, 12),
                  substitution: bool = False) -> str:
    """A document of demonstration lines for one hidden rule (random when `rule` is None).

    `n_demos` is a count or an inclusive (low, high) range to draw it from. With
    `substitution`, one random letter mapping is drawn for the document and applied to every
    output.
    """
    rule = rng.choice(sorted(RULES)) if rule is None else rule
    count = rng.randint(*n_demos) if isinstance(n_demos, tuple) else n_demos
    mapping = random_substitution(rng) if substitution else None
    lines = []
    for _ in range(count):
        word = random_word(rng)
        lines.append(demo_line(word, apply_rule(rule, word, mapping)))
    return "".join(lines)


def make_query(rng: random.Random, rule: str) -> tuple[str, str, dict[str, str]]:
    """A held-out query for `rule`: (input word, its correct output, outputs of every rule).

    The input is drawn so that all rules give different outputs on it, which makes
    "the outputs of all rules" a well-posed multiple-choice set with exactly one right answer.
    """
    while True:
        word = random_word(rng)
        outputs = {name: fn(word) for name, fn in RULES.items()}
        if len(set(outputs.values())) == len(outputs):
            return word, outputs[rule], outputs


def make_corpus(seed: int, n_documents: int, n_demos: int | tuple[int, int] = (4, 12),
                substitution_fraction: float = 0.0) -> list[str]:
    """`n_documents` documents, each with its own random rule; a fraction uses a substitution."""
    rng = random.Random(seed)
    return [make_document(rng, n_demos=n_demos, substitution=rng.random() < substitution_fraction)
            for _ in range(n_documents)]


def few_shot_prompt(rng: random.Random, rule: str, shots: int, word: str) -> str:
    """`shots` demonstrations of `rule` on fresh words, then the query prompt for `word`."""
    demos = []
    while len(demos) < shots:
        demo = random_word(rng)
        if demo != word:
            demos.append(demo_line(demo, apply_rule(rule, demo)))
    return "".join(demos) + query_prompt(word)


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


def completion_rows(rng: random.Random, rule: Callable[[str], str], n: int) -> list[dict]:
    """`n` zero-shot rows in the recipe's completion format: prompt 'Q: w A:', completion ' out'."""
    return [{"prompt": query_prompt(w), "completion": f" {rule(w)}\n"}
            for w in (random_word(rng) for _ in range(n))]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="icl_rules tools: build the tokenizer, score a model")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer and save it")
    p.add_argument("out_dir")
    p = sub.add_parser("quickstart-data", help="write the quickstart's rotate-rule jsonl files")
    p.add_argument("out_dir")
    p = sub.add_parser("score", help="few-shot multiple-choice accuracy of a model")
    p.add_argument("model", help="model dir or bundled:NAME")
    p.add_argument("--shots", default="0,1,3,5")
    p.add_argument("--queries-per-rule", type=int, default=50)
    args = parser.parse_args()
    if args.command == "tokenizer":
        print(f"vocab size {len(train_tokenizer(args.out_dir))}, saved to {args.out_dir}")
    elif args.command == "quickstart-data":
        import json
        from pathlib import Path

        rng = random.Random(0)
        for split, n in (("train", 512), ("eval", 64)):
            path = Path(args.out_dir) / f"rotate-{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = completion_rows(rng, HELD_OUT_RULES["rotate"], n)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            print(f"{len(rows)} rows -> {path}")
    else:
        from mamba_ft.models import load_model

        loaded = load_model(args.model, allow_transformers=True)
        shots = [int(s) for s in args.shots.split(",")]
        print(few_shot_accuracy(loaded.model, loaded.tokenizer, shots, args.queries_per_rule))
