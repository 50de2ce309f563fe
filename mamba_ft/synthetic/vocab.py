"""The token vocabulary of a synthetic task, and a matching Hugging Face tokenizer.

Synthetic tasks work on symbols, one token each (a letter, a number below a prime, a bracket),
so the vocabulary is a plain list and encoding is a dictionary lookup. `hf_tokenizer()` builds
the same mapping as a `tokenizers` word-level tokenizer wrapped for transformers, so models
trained here can be saved, reloaded and driven with `generate` like any other checkpoint.
Text form: tokens joined by single spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    pad: str
    bos: str
    eos: str
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be distinct")
        for special in (self.pad, self.bos, self.eos):
            if special not in self.tokens:
                raise ValueError(f"special token {special!r} is not in the vocabulary")
        if any(not t or any(c.isspace() for c in t) for t in self.tokens):
            raise ValueError("vocabulary tokens must be non-empty and contain no whitespace")
        object.__setattr__(self, "index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self.index[self.pad]

    @property
    def bos_id(self) -> int:
        return self.index[self.bos]

    @property
    def eos_id(self) -> int:
        return self.index[self.eos]

    def encode(self, tokens) -> list[int]:
        return [self.index[t] for t in tokens]

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    def hf_tokenizer(self):
        """A `PreTrainedTokenizerFast` whose ids equal `encode` on space-separated text."""
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(WordLevel(vocab=dict(self.index), unk_token=None))
        core.pre_tokenizer = WhitespaceSplit()
        # The decoder joins tokens with spaces by default for WordLevel, which is our text form.
        return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=self.pad,
                                       bos_token=self.bos, eos_token=self.eos)
