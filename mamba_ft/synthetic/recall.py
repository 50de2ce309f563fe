"""Multi-query associative recall (MQAR; Arora et al., Zoology, arXiv 2312.04927), two formats.

`mqar`: `<bos> k1 v1 k2 v2 ... kn vn | q1 a1 q2 a2 ... qn an`: n key-value pairs, keys drawn
without replacement from the key half of the vocabulary and values from the value half; then
every key is asked again in a random order, each query followed by its value. Only the values
after queries are supervised: the queries themselves are given. Each answered value stays in
the input for the later queries.

`mqar_zoology`: the format Zoology trains and tests on. Keys and values are both distinct,
from disjoint halves of a realistic vocabulary (8192 by default). After the n pairs comes a
query region of 2-token slots, `tokens_per_pair · n − 2n` tokens in all: each key is queried
once, in its own slot (the key, then a filler), and every other position is a filler. The
target at a query is its key's value, predicted from the key: the input never holds it, so no
answer is fed back. Queries take slots at power-law distances: slot g (g = 1 for the slot
right after the context) is drawn with weight g^(−gap_exponent), without replacement, one key
at a time in the order the keys stand in the context (a random order). So the first key's gap
follows the power law exactly over all slots, and each later key's over the slots still free
(Zoology's power_a 0.01 is gap_exponent 0.99).

Answering needs the whole table held in the state (or attended to), so recall measures how
much a fixed-size state can store. The length knob is n, the number of pairs.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from functools import cached_property, lru_cache

from mamba_ft.errors import UserError
from mamba_ft.synthetic.base import Example, Task
from mamba_ft.synthetic.vocab import Vocab


@dataclass
class RecallTask(Task):
    keys: int = 64
    values: int = 64

    name = "mqar"
    length_name = "number of key-value pairs"

    def __post_init__(self):
        if not 2 <= self.keys <= 8192 or not 2 <= self.values <= 8192:
            raise UserError(f"keys={self.keys}, values={self.values} are out of range for task "
                            f"{self.name!r}; use 2 to 8192 of each.")
        self.max_length = self.keys  # keys are distinct within an example

    @cached_property
    def vocab(self) -> Vocab:
        tokens = tuple(f"k{i}" for i in range(self.keys)) + tuple(f"v{i}" for i in range(self.values))
        return Vocab(tokens + ("|", "<bos>", "<eos>", "<pad>"), pad="<pad>", bos="<bos>", eos="<eos>")

    def sample(self, rng: random.Random, length: int) -> Example:
        keys = [f"k{i}" for i in rng.sample(range(self.keys), length)]
        table = {k: f"v{rng.randrange(self.values)}" for k in keys}
        prompt = ["<bos>"] + [tok for k in keys for tok in (k, table[k])] + ["|"]
        queries = rng.sample(keys, length)
        answer = [tok for q in queries for tok in (q, table[q])]
        return Example(tuple(prompt), tuple(answer), (False, True) * length)


FILLER = "<fill>"


@dataclass
class ZoologyRecallTask(Task):
    vocab_size: int = 8192  # key and value tokens: the first half keys, the rest values
    tokens_per_pair: int = 16  # the example after <bos> is this many tokens per pair
    gap_exponent: float = 0.99  # query slot g drawn with weight g ** -gap_exponent

    name = "mqar_zoology"
    length_name = "number of key-value pairs"

    def __post_init__(self):
        if not 4 <= self.vocab_size <= 131_072:
            raise UserError(f"vocab_size={self.vocab_size} is out of range for task {self.name!r}; "
                            f"use 4 to 131072 (Zoology: 8192).")
        if not 4 <= self.tokens_per_pair <= 1024 or self.tokens_per_pair % 2:
            raise UserError(f"tokens_per_pair={self.tokens_per_pair} is out of range for task "
                            f"{self.name!r}; use an even number from 4 (a query slot per pair) to "
                            f"1024 (Zoology: 16, e.g. 64 tokens for 4 pairs).")
        if not 0 <= self.gap_exponent <= 10:
            raise UserError(f"gap_exponent={self.gap_exponent} is out of range for task {self.name!r}; "
                            f"use 0 (uniform slots) to 10 (Zoology: 0.99).")
        self.max_length = self.vocab_size // 2  # keys (the smaller half) are distinct

    @cached_property
    def vocab(self) -> Vocab:
        n_keys = self.vocab_size // 2
        tokens = (tuple(f"k{i}" for i in range(n_keys))
                  + tuple(f"v{i}" for i in range(self.vocab_size - n_keys)))
        return Vocab(tokens + (FILLER, "<bos>", "<eos>", "<pad>"), pad="<pad>", bos="<bos>", eos="<eos>")

    def slots(self, length: int) -> int:
        """The query region's 2-token slots for `length` pairs."""
        return (self.tokens_per_pair - 2) * length // 2

    def sample(self, rng: random.Random, length: int) -> Example:
        n_keys = self.vocab_size // 2
        keys = [f"k{i}" for i in rng.sample(range(n_keys), length)]
        values = [f"v{i}" for i in rng.sample(range(self.vocab_size - n_keys), length)]
        # Weighted sampling without replacement in one pass (Efraimidis and Spirakis): each slot
        # gets log(u)/w for a uniform u in (0, 1]; the `length` largest win, in the order of
        # their draws, so taking them largest first is drawing one slot at a time with
        # probability proportional to the weights of the slots still free.
        weights = _slot_weights(self.slots(length), self.gap_exponent)
        draws = [math.log(1.0 - rng.random()) / w for w in weights]
        chosen = heapq.nlargest(length, range(len(weights)), key=draws.__getitem__)
        answer = [FILLER] * (2 * len(weights))
        targets = list(answer)
        for slot, key, value in zip(chosen, keys, values):  # draw i queries the context's key i
            answer[2 * slot] = targets[2 * slot] = key
            targets[2 * slot + 1] = value
        prompt = ["<bos>"] + [tok for k, v in zip(keys, values) for tok in (k, v)]
        supervised = tuple(t != a for t, a in zip(targets, answer))
        return Example(tuple(prompt), tuple(answer), supervised, tuple(targets))


@lru_cache(maxsize=64)
def _slot_weights(slots: int, exponent: float) -> tuple[float, ...]:
    return tuple(g ** -exponent for g in range(1, slots + 1))
