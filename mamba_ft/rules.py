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


def completion_rows(rng: random.Random, rule: Callable[[str], str], n: int) -> list[dict]:
    """`n` zero-shot rows in the recipe's completion format: prompt 'Q: w A:', completion ' out'."""
    return [{"prompt": query_prompt(w), "completion": f" {rule(w)}\n"}
            for w in (random_word(rng) for _ in range(n))]


# The instruction of `instruction_rows`; the bundled tokenizer was trained with this sentence.
INSTRUCTION = "Apply the rule to the word."


def instruction_rows(rng: random.Random, n: int, n_demos: tuple[int, int] = (1, 5)) -> list[dict]:
    """`n` instruction-tuning rows in the recipe's alpaca format, each one in-context task.

    `input` holds a few demonstration lines of a random rule, then the query prompt; `output`
    is the rule's answer to the query as the corpus writes it (' ' + output + newline, the
    tokens the ICL tasks score). A model tuned on them practises reading a rule off examples,
    but inside an instruction template the ICL tasks never show. The query is drawn as in
    `make_query`, so its answer names exactly one rule.
    """
    rows = []
    for _ in range(n):
        rule = rng.choice(sorted(RULES))
        word, answer, _ = make_query(rng, rule)
        prompt = few_shot_prompt(rng, rule, rng.randint(*n_demos), word)
        rows.append({"instruction": INSTRUCTION, "input": prompt, "output": f" {answer}\n"})
    return rows
