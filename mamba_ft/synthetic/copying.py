"""COPY and n-gram lookup (Jelassi et al. 2024, "Repeat After Me", arXiv 2402.01032).

- copy:          `$ s | s .`            reproduce the whole string.
- prefix_ngram:  `$ g | s | c .`        the n-gram g is given first, then s; answer with the
                                        `answer_len` tokens c that follow g in s. The query
                                        comes before the data, so a fixed-size state can keep
                                        just what it needs (GSSMs do well here).
- suffix_ngram:  `$ s | g c .`          the n-gram comes after s; answer with what followed it.
                                        Any part of s may be asked for, so the whole string
                                        must be stored (GSSMs fail past their training length).
s is uniform over the first `alphabet` lowercase letters; g occurs exactly once in s.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from functools import cached_property

from mamba_ft.errors import UserError
from mamba_ft.synthetic.base import Example, Task, full_answer
from mamba_ft.synthetic.vocab import Vocab

_SPECIALS = ("$", "|", ".", "*")  # bos, separator, eos, pad: Jelassi's four


@dataclass
class CopyTask(Task):
    alphabet: int = 26

    name = "copy"
    length_name = "string length"

    def __post_init__(self):
        if not 2 <= self.alphabet <= 26:
            raise UserError(f"alphabet={self.alphabet} is out of range for task {self.name!r}; "
                            f"use 2 to 26 letters.")

    @cached_property
    def vocab(self) -> Vocab:
        return Vocab(tuple(string.ascii_lowercase[: self.alphabet]) + _SPECIALS, pad="*", bos="$", eos=".")

    def random_string(self, rng: random.Random, length: int) -> list[str]:
        return rng.choices(string.ascii_lowercase[: self.alphabet], k=length)

    def sample(self, rng: random.Random, length: int) -> Example:
        s = self.random_string(rng, length)
        return full_answer(["$", *s, "|"], [*s, "."])

    def information_bits(self, length: int) -> float:
        """The string is uniform over alphabet^length and all of it is asked for after `|`:
        length x log2(alphabet) bits. That is the task's distribution; a test set, which drops
        the prompts seen in training, is drawn from slightly fewer strings where those are many
        (short lengths)."""
        return length * math.log2(self.alphabet)


@dataclass
class _NgramLookup(CopyTask):
    ngram: int = 3
    answer_len: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.ngram <= 16 or not 1 <= self.answer_len <= 64:
            raise UserError(f"ngram={self.ngram}, answer_len={self.answer_len} are out of range for "
                            f"task {self.name!r}; use ngram in [1, 16] and answer_len in [1, 64].")
        # A string must hold the n-gram and the answer after it; a unique n-gram also needs
        # enough distinct strings of that size, which a tiny alphabet may not give.
        self.min_length = self.ngram + self.answer_len
        if self.alphabet ** self.ngram < 4 * self.min_length:
            raise UserError(f"With alphabet={self.alphabet} and ngram={self.ngram}, unique {self.ngram}-grams "
                            f"are too rare; use a larger alphabet or ngram.")

    def information_bits(self, length: int) -> None:
        return None  # only part of the string is asked for; not defined here

    def lookup(self, rng: random.Random, length: int) -> tuple[list[str], list[str], list[str]]:
        """(string, an n-gram occurring in it exactly once, the `answer_len` tokens after it)."""
        s, i = self.string_with_unique_ngram(rng, length)
        return s, s[i:i + self.ngram], s[i + self.ngram: i + self.ngram + self.answer_len]

    def string_with_unique_ngram(self, rng: random.Random, length: int) -> tuple[list[str], int]:
        """A random string and the start of an n-gram that occurs in it exactly once and is
        followed by at least `answer_len` tokens."""
        for _ in range(1000):
            s = self.random_string(rng, length)
            grams = [tuple(s[i:i + self.ngram]) for i in range(length - self.ngram + 1)]
            counts: dict[tuple, int] = {}
            for g in grams:
                counts[g] = counts.get(g, 0) + 1
            starts = [i for i in range(length - self.ngram - self.answer_len + 1) if counts[grams[i]] == 1]
            if starts:
                return s, rng.choice(starts)
        raise UserError(f"Could not find a unique {self.ngram}-gram in strings of length {length} over "
                        f"{self.alphabet} letters; use a larger alphabet or ngram.")


@dataclass
class PrefixNgramTask(_NgramLookup):
    name = "prefix_ngram"

    def sample(self, rng: random.Random, length: int) -> Example:
        s, gram, cont = self.lookup(rng, length)
        return full_answer(["$", *gram, "|", *s, "|"], [*cont, "."])


@dataclass
class SuffixNgramTask(_NgramLookup):
    name = "suffix_ngram"

    def sample(self, rng: random.Random, length: int) -> Example:
        s, gram, cont = self.lookup(rng, length)
        return full_answer(["$", *s, "|", *gram], [*cont, "."])
