"""Multi-query associative recall (MQAR; Arora et al., Zoology, arXiv 2312.04927).

`<bos> k1 v1 k2 v2 ... kn vn | q1 a1 q2 a2 ... qn an`: n key-value pairs, keys drawn without
replacement from the key half of the vocabulary and values from the value half; then every key
is asked again in a random order, each query followed by its value. Only the values after
queries are supervised: the queries themselves are given. Answering needs the whole table held
in the state (or attended to), so recall measures how much a fixed-size state can store.
The length knob is n, the number of pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

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
