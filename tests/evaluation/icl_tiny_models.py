"""A tiny random Mamba with a character tokenizer, and reference scoring with plain transformers.

Most tests use the bundled tiny models (trained, so outputs depend on the context). The random
model here exists for what they lack: an `in_proj` bias, and a tokenizer without a pad token.
The tokenizer has one token per character of the rule tasks' text ("Q: abc A: cba\\n").
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = list(string.ascii_lowercase) + [" ", "\n", ":", "Q", "A"]


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(CHARS)})
    # BPE with no merges splits the text into single characters, spaces and newlines included.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")


def save_tiny_mamba(directory: Path, seed: int = 0, in_proj_bias: bool = False) -> Path:
    from transformers import MambaConfig, MambaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=len(tok), hidden_size=32, state_size=8, num_hidden_layers=2,
                         expand=2, conv_kernel=4, time_step_rank=4, use_bias=in_proj_bias,
                         eos_token_id=0, bos_token_id=0, pad_token_id=None)
    model = MambaForCausalLM(config)
    with torch.no_grad():
        # transformers' init gives near-uniform next-token distributions, under which greedy
        # generation emits one symbol whatever the context; larger weights make the outputs
        # depend on the context, so batched and unbatched generation can be told apart.
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.mul_(4)
            elif name.endswith("in_proj.bias"):
                param.normal_()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)


def reference(directory):
    """The checkpoint as plain transformers loads it (its own Mamba mixer), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one unpadded forward of a plain transformers model."""
    ctx = tokenizer(context).input_ids
    cont = tokenizer(continuation).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(logprobs[p, t].item() for p, t in zip(positions, cont))


def reference_greedy(model, tokenizer, context: str, max_new: int, until: str) -> str:
    """Greedy continuation by full re-forwards (no cache, no padding), cut at `until`."""
    ids = tokenizer(context).input_ids
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
    text = tokenizer.decode(out, skip_special_tokens=True)  # as lm-eval decodes
    return text.split(until)[0]
