"""Token-by-token decoding of pure Mamba models, the one-token step replayed as a CUDA graph.

transformers' `generate` issues every kernel of every layer from Python for each new token, so
decoding a Mamba model is bound by the host: about 0.9 ms of host time per layer per token
(docs/benchmarks.md), 20-26 tokens/s at Mamba-1.4B batch 1, where reading the bf16 weights
once per token would allow well over a thousand. A Mamba model's decoding state has a fixed
size (each layer's conv window and SSM state), and transformers' linear-attention cache
updates those tensors in place (`copy_`, to keep their addresses for CUDA graphs), so the
whole one-token forward can be captured once and replayed: each new token then costs one
`replay()`, the token choice and a copy.

What replay requires, and how it is met here:
- Static inputs and state: the step reads its token ids from a buffer the decoder owns, and
  the cache's tensors keep their addresses from step to step (a seam test holds transformers
  to that).
- Kernels compiled and cuBLAS set up before capture: warm-up steps on a side stream. They
  advance the state, so every tensor of the cache is saved before them and put back after the
  capture.
- No host synchronisation inside the step: the one-token forward has none; the token choice
  (greedy or sampled) runs outside the graph.
Hybrid models' attention caches grow by a position per token, so their steps cannot be
replayed; they decode with transformers' `generate` (`mamba_ft.generation` chooses).

The token choice follows transformers' `generate`: the last position's logits in fp32, then
greedy argmax, or transformers' own temperature / top-k / top-p warpers in its order (options
not given come from the model's generation config, as in `generate`) and
`torch.multinomial`; with the same seed the tokens are `generate`'s. A generation config that
asks for anything more (a repetition penalty, banned words, ...) is not this loop's to apply:
`why_generate_decodes` says so, and the caller uses `generate`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from mamba_ft.models.model_types import MODEL_TYPES, is_hybrid

# The generation-config fields this loop applies itself, or that do not change the tokens
# (what `generate` returns besides them); any other field set away from transformers' default
# would change `generate`'s tokens.
_APPLIED_CONFIG_FIELDS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample",
    "temperature", "top_k", "top_p", "max_length", "max_new_tokens", "use_cache",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate", "transformers_version", "_from_model_config",
})
_WARMUP_STEPS = 2


def unapplied_generation_config(model: nn.Module) -> list[str]:
    """Fields of the model's generation config that this loop would not apply."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    defaults = config._get_default_generation_params()
    return sorted(name for name, value in config.to_diff_dict().items()
                  if name not in _APPLIED_CONFIG_FIELDS and value is not None
                  and value != defaults.get(name))


def has_fixed_size_state(model: nn.Module) -> bool:
    """A pure Mamba model: every layer's decoding state is a conv window and an SSM state."""
    return getattr(model.config, "model_type", None) in MODEL_TYPES and not is_hybrid(model)


def why_generate_decodes(model: nn.Module) -> str | None:
    """Why `model` decodes with transformers' `generate` rather than `Decoder`, in a line; None
    when `Decoder` gives it `generate`'s tokens (a pure Mamba model whose generation config
    asks for nothing beyond sampling)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"{model_type!r} is not a Mamba model: its attention cache grows each token"
    if is_hybrid(model):
        return (f"{MODEL_TYPES[model_type].name} has attention layers, whose cache grows each "
                f"token")
    extra = unapplied_generation_config(model)
    if extra:
        return f"the model's generation config sets {', '.join(extra)}, which generate applies"
    return None


def token_chooser(model: nn.Module, sample: bool = False, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """fp32 logits (batch, vocab) -> token ids (batch,), as transformers' `generate` picks them."""
    if not sample:
        return lambda logits: logits.argmax(dim=-1)
    from transformers.generation import (LogitsProcessorList, TemperatureLogitsWarper,
                                         TopKLogitsWarper, TopPLogitsWarper)

    config = model.generation_config
    # An option neither given nor in the model's config takes generate's global default (top-k
    # 50, for one), as generate resolves it.
    global_defaults = config._get_default_generation_params()

    def resolved(name, given):
        for value in (given, getattr(config, name), global_defaults[name]):
            if value is not None:
                return value

    temperature, top_k, top_p = (resolved("temperature", temperature), resolved("top_k", top_k),
                                 resolved("top_p", top_p))
    warpers = LogitsProcessorList()
    # transformers' order and conditions (GenerationMixin._get_logits_processor).
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scores = warpers(None, logits)  # these warpers do not read the ids so far
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)

    return choose


def _cache_keyword(model: nn.Module) -> str:
    """The forward's cache keyword: `cache` (transformers 5.24 and later) or `cache_params`."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("cache", "cache_params"):
        if name in parameters:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `cache_params`; "
                    f"this transformers version's cache keyword is unknown to mamba-ft.")


def output_cache(output):
    """The cache a forward returned (transformers 5.24 renamed `cache_params` to `cache`)."""
    return getattr(output, "cache", None) or getattr(output, "cache_params", None)


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor the cache's layers hold: the state a decoding step reads and writes."""
    tensors = []
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, dict):
                value = list(value.values())
            items = value if isinstance(value, (list, tuple)) else [value]
            tensors += [item for item in items if isinstance(item, torch.Tensor)]
    return tensors


class Decoder:
    """Greedy or sampled decoding of a pure Mamba model with a fixed-size cache.

    `cuda_graph` (default: whether the model is on a CUDA device) replays the one-token step
    as a CUDA graph; without it the same loop runs each step eagerly."""

    def __init__(self, model: nn.Module, cuda_graph: bool | None = None):
        if not has_fixed_size_state(model):
            raise ValueError(f"{type(model).__name__} is not a pure Mamba model: its attention "
                             f"cache grows each step; decode it with transformers' generate.")
        self.model = model
        self._cache_keyword = _cache_keyword(model)
        device = next(model.parameters()).device
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError("CUDA-graph decoding needs the model on a CUDA device.")

    def _forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """The last position's logits in fp32, advancing `cache` by the tokens `ids`."""
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_keyword: cache})
        return out.logits[:, -1].float()

    def _captured_step(self, ids: torch.Tensor, cache) -> Callable[[], torch.Tensor]:
        """`_forward(ids, cache)` as a CUDA graph: a function that replays it and returns its
        logits buffer. The cache's state is as before this call."""
        state = cache_tensors(cache)
        saved = [tensor.clone() for tensor in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self._forward(ids, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward(ids, cache)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 choose: Callable[[torch.Tensor], torch.Tensor], *,
                 attention_mask: torch.Tensor | None = None, eos_token_id=None,
                 pad_token_id: int | None = None, streamer=None) -> torch.Tensor:
        """The prompt ids followed by up to `max_new_tokens` new ones, (batch, prompt + new).

        As transformers' `generate`: a row that produced an end-of-sequence token is padded
        with `pad_token_id` from then on, and decoding stops once every row has ended.
        `streamer` (transformers' `TextStreamer` protocol) gets the prompt, then each token."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens}).")
        eos = None
        if eos_token_id is not None:
            eos = torch.as_tensor(eos_token_id, device=input_ids.device).reshape(-1)
            if pad_token_id is None:
                raise ValueError("pad_token_id is needed to pad rows that ended (eos_token_id "
                                 "is given).")
        if streamer is not None:
            streamer.put(input_ids.cpu())
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        cache = output_cache(out)
        logits = out.logits[:, -1].float()
        ids = torch.empty_like(input_ids[:, :1])  # the step's input: the token just chosen
        step = None
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for i in range(max_new_tokens):
            token = choose(logits)
            if eos is not None:
                token = torch.where(finished, pad_token_id, token)
                finished |= torch.isin(token, eos)
            new_tokens.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            if i + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            ids.copy_(token[:, None])
            if step is None:
                step = (self._captured_step(ids, cache) if self.cuda_graph
                        else lambda: self._forward(ids, cache))
            logits = step()
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
