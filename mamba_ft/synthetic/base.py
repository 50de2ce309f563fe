"""What every synthetic task shares: the example layout, the task interface and the registry.

An example is a prompt followed by an answer, both token sequences. The model reads the prompt
and must produce the answer; only answer tokens marked `supervised` carry a loss and are
scored (multi-query recall interleaves given query keys, unsupervised, with the values to
recall). Every task has one integer "length" knob (string length, number of key-value pairs,
number of operators, sequence length) so training ranges and test lengths mean the same thing
across tasks: train on lengths in [min, max], test at any list of lengths.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from mamba_ft.errors import UserError
from mamba_ft.synthetic.vocab import Vocab


@dataclass(frozen=True)
class Example:
    prompt: tuple[str, ...]
    answer: tuple[str, ...]
    supervised: tuple[bool, ...]  # one flag per answer token
    # What each answer position must be predicted as, where that is not the token the input
    # holds there (Zoology's MQAR: the input has a filler where the value is the target). An
    # example with targets must never hold an answer in its input: its input is then fixed,
    # and greedy decoding reads it teacher-forced. None: the answer tokens themselves.
    targets: tuple[str, ...] | None = None

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.prompt + self.answer

    @property
    def expected(self) -> tuple[str, ...]:
        """The reference prediction at every answer position (labels, scoring)."""
        return self.answer if self.targets is None else self.targets

    @property
    def contiguous_answer(self) -> bool:
        """True when every answer token is supervised: the answer can be generated freely."""
        return all(self.supervised)


def full_answer(prompt, answer) -> Example:
    return Example(tuple(prompt), tuple(answer), (True,) * len(answer))


class Task:
    """A family of examples: subclasses set `name`, `length_name`, `vocab` and implement `sample`."""

    name: str = ""
    length_name: str = "length"
    # The token after whose last occurrence the final answer stands (None: the whole answer).
    final_marker: str | None = None
    min_length: int = 1
    max_length: int = 100_000

    @property
    def vocab(self) -> Vocab:
        raise NotImplementedError

    @classmethod
    def parameter_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def sample(self, rng: random.Random, length: int) -> Example:
        raise NotImplementedError

    def information_bits(self, length: int) -> float | None:
        """The entropy, in bits, of what an example of `length` makes the model carry from the
        end of its prompt into its answer (in a Mamba: in its recurrent state and conv window).
        None where a task does not define it (only COPY does, for now)."""
        return None

    def check_length(self, length: int, what: str) -> None:
        if not self.min_length <= length <= self.max_length:
            raise UserError(f"{what} {length} is out of range for task {self.name!r}: its "
                            f"{self.length_name} must lie in [{self.min_length}, {self.max_length}].")

    def final_answer(self, answer_tokens) -> tuple[str, ...]:
        """The part of a (generated) answer that is the final result, read up to the first EOS."""
        tokens = list(answer_tokens)
        if self.vocab.eos in tokens:
            tokens = tokens[: tokens.index(self.vocab.eos)]
        if self.final_marker is not None and self.final_marker in tokens:
            last = len(tokens) - 1 - tokens[::-1].index(self.final_marker)
            tokens = tokens[last + 1:]
        return tuple(tokens)
