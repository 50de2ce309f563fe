"""How much a model's outputs move under lower precision, and how its dynamics carry a small
input change forward: the measurements behind "Mamba is as robust to mixed precision as a
Transformer" (Halloran et al., docs/precision.md).

Three probes, for any causal LM (a Mamba or a Transformer, with or without adapters):

- `precision_divergence`: the same tokens through the model in fp32 and in a lower precision
  (bf16 / fp16, as autocast over fp32 weights or as the weights themselves cast), compared per
  position: KL(p_fp32 || p_low) of the next-token distributions and the relative error of the
  logits; for a Mamba also the recurrent state each mixer ends with.
- `perturbation_growth`: the input embedding at one position moved by a small vector, and the
  resulting deviation of every layer's hidden state at each later position. The slope of its
  logarithm against the distance is an empirical largest-Lyapunov-exponent estimate: negative
  where the dynamics forget the perturbation, positive where they amplify it.
- `model_drift`: two models (the same recipe fine-tuned in fp32 and in bf16) on the same tokens,
  both in fp32, compared per position with the same two measures.

All work on the model's own forward; `perturbation_growth` takes any function from input
embeddings to per-layer hidden states, so it can be checked on a recurrence whose exponent is
known.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOW_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Divergence:
    """One model, one low precision: per-position measures, averaged over the batch rows."""

    precision: str
    how: str  # "autocast" (fp32 weights, low-precision compute) or "weights" (weights cast)
    kl: list[float]  # KL(p_fp32 || p_low) in nats, per position
    logit_rel_error: list[float]  # ||logits_low - logits_fp32|| / ||logits_fp32||, per position
    state_rel_error: list[float] | None  # per Mamba layer, the final recurrent state; None otherwise

    def summary(self) -> dict:
        return {"precision": self.precision, "how": self.how,
                "mean_kl": sum(self.kl) / len(self.kl), "max_kl": max(self.kl),
                "mean_logit_rel_error": sum(self.logit_rel_error) / len(self.logit_rel_error),
                "max_state_rel_error": max(self.state_rel_error) if self.state_rel_error else None}


@torch.no_grad()
def precision_divergence(model, input_ids: torch.Tensor, precision: str = "bf16",
                         how: str = "autocast") -> Divergence:
    """Compare the model's fp32 forward with its `precision` forward on `input_ids`.

    `how`: "autocast" runs the fp32 weights under autocast (mixed-precision training's forward);
    "weights" casts a copy of the model to the low precision (pure low-precision inference).
    """
    if precision not in LOW_PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(LOW_PRECISIONS)}, not {precision!r}")
    if how not in ("autocast", "weights"):
        raise ValueError(f"how must be 'autocast' or 'weights', not {how!r}")
    dtype = LOW_PRECISIONS[precision]
    was_training = model.training
    model.eval()
    try:
        ref_logits, ref_states = _forward(model, input_ids, contextlib.nullcontext())
        if how == "autocast":
            low_model, context = model, torch.autocast(input_ids.device.type, dtype=dtype)
        else:
            low_model, context = copy.deepcopy(model).to(dtype), contextlib.nullcontext()
        low_logits, low_states = _forward(low_model, input_ids, context)
    finally:
        model.train(was_training)
    kl, rel = compare_logits(ref_logits, low_logits)
    state_rel = None
    if ref_states:
        state_rel = [float((low.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
                     for ref, low in zip(ref_states, low_states)]
    return Divergence(precision=precision, how=how, kl=kl.mean(0).tolist(),
                      logit_rel_error=rel.mean(0).tolist(), state_rel_error=state_rel)


def compare_logits(ref_logits: torch.Tensor, other_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, position): KL(p_ref || p_other) of the next-token distributions in nats, and
    the relative error ||other - ref|| / ||ref|| of the logits.

    Computed in float64: a KL of 1e-6 is the sum of terms p·(log p − log q) whose first-order
    parts cancel, and float32 log-probabilities (errors ~1e-6 for logits ~10) leave it tens of
    percent off; precision drift is measured exactly at that size.
    """
    ref, other = ref_logits.double(), other_logits.double()
    ref_logp, other_logp = F.log_softmax(ref, dim=-1), F.log_softmax(other, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - other_logp)).sum(-1)
    rel = (other - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    return kl, rel


@dataclass
class Drift:
    """Two models on the same tokens, with no autocast: how far the second's outputs lie from the
    first's, per position (averaged over the rows)."""

    kl: list[float]  # KL(p_reference || p_other) in nats
    logit_rel_error: list[float]  # ||logits_other - logits_reference|| / ||logits_reference||

    def summary(self) -> dict:
        return {"mean_kl": sum(self.kl) / len(self.kl), "max_kl": max(self.kl),
                "mean_logit_rel_error": sum(self.logit_rel_error) / len(self.logit_rel_error)}


@torch.no_grad()
def model_drift(reference, other, input_ids: torch.Tensor) -> Drift:
    """How far `other` (e.g. a model fine-tuned in bf16) has moved from `reference` (the same
    recipe fine-tuned in fp32): both run with no autocast, in their weights' dtype (fp32 for
    fp32 weights), so what is measured is the difference their weights make, not the precision
    of this forward."""
    logits = []
    for model in (reference, other):
        was_training = model.training
        model.eval()
        try:
            logits.append(_forward(model, input_ids, contextlib.nullcontext())[0])
        finally:
            model.train(was_training)
    kl, rel = compare_logits(*logits)
    return Drift(kl=kl.mean(0).tolist(), logit_rel_error=rel.mean(0).tolist())


def _forward(model, input_ids, context):
    """Logits, and the recurrent state each Mamba mixer ends with (empty for other models)."""
    from mamba_ft.decoding import output_cache
    from mamba_ft.models import mixers

    is_mamba = bool(mixers(model))
    with context:
        out = model(input_ids=input_ids, use_cache=is_mamba)
    states = []
    if is_mamba:
        cache = output_cache(out)
        states = [cache.get_recurrent_state(m.layer_idx) for m in mixers(model)]
    return out.logits, states


@dataclass
class Growth:
    """How a perturbation of size `epsilon` at `position` spreads, per layer."""

    position: int
    epsilon: float
    deviation: list[list[float]]  # [layer][distance]: ||h' - h|| / epsilon at position + distance
    exponent: list[float | None]  # [layer]: least-squares slope of log deviation per position

    def summary(self) -> dict:
        finite = [e for e in self.exponent if e is not None]
        return {"position": self.position, "epsilon": self.epsilon,
                "largest_exponent": max(finite) if finite else None,
                "exponent_per_layer": self.exponent}


@torch.no_grad()
def perturbation_growth(hidden_states_fn: Callable[[torch.Tensor], list[torch.Tensor]],
                        embeddings: torch.Tensor, position: int, epsilon: float = 1e-3,
                        seed: int = 0, window: int | None = None) -> Growth:
    """Perturb `embeddings` (batch, L, d) at `position` by `epsilon` (a random unit direction
    per row) and follow each layer's deviation over the positions after it.

    `hidden_states_fn(embeddings)` returns the per-layer hidden states, each (batch, L, d). The
    exponent fits log(deviation) against the distance over the `window` positions after the
    perturbed one (all the rest by default); a deviation that vanishes exactly is left out.
    """
    length = embeddings.shape[1]
    if not 0 <= position < length - 1:
        raise ValueError(f"position must leave at least one later position (0 <= position < {length - 1})")
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(embeddings.shape[0], embeddings.shape[-1], generator=generator)
    direction = (direction / direction.norm(dim=-1, keepdim=True)).to(embeddings)
    moved = embeddings.clone()
    moved[:, position] += epsilon * direction
    base, shifted = hidden_states_fn(embeddings), hidden_states_fn(moved)
    end = length if window is None else min(length, position + 1 + window)
    deviation, exponent = [], []
    for h, h_moved in zip(base, shifted):
        per_distance = ((h_moved[:, position:end].double() - h[:, position:end].double())
                        .norm(dim=-1).mean(0) / epsilon)
        deviation.append(per_distance.tolist())
        exponent.append(_log_slope(per_distance[1:].tolist()))
    return Growth(position=position, epsilon=epsilon, deviation=deviation, exponent=exponent)


def _log_slope(values: list[float]) -> float | None:
    """Least-squares slope of log(value) against its index (1, 2, ...), over positive values."""
    points = [(i + 1, math.log(v)) for i, v in enumerate(values) if v > 0 and math.isfinite(v)]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def model_hidden_states_fn(model) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The per-layer outputs of a transformers causal LM, from input embeddings."""

    def hidden_states(embeddings: torch.Tensor) -> list[torch.Tensor]:
        out = model(inputs_embeds=embeddings, output_hidden_states=True, use_cache=False)
        return [h.float() for h in out.hidden_states[1:]]

    return hidden_states


@torch.no_grad()
def model_perturbation_growth(model, input_ids: torch.Tensor, position: int, epsilon: float = 1e-3,
                              seed: int = 0, window: int | None = None) -> Growth:
    """`perturbation_growth` of a transformers causal LM at its input embeddings, in fp32."""
    was_training = model.training
    model.eval()
    try:
        embeddings = model.get_input_embeddings()(input_ids).float()
        return perturbation_growth(model_hidden_states_fn(model), embeddings, position, epsilon,
                                   seed=seed, window=window)
    finally:
        model.train(was_training)
