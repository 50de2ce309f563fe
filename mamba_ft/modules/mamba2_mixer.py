"""mamba-ft's Mamba-2 mixer: transformers' `Mamba2Mixer` parameters, mamba-ft's ops.

The module owns exactly the parameters transformers' mixer owns, under the same names
(conv1d, in_proj, dt_bias, A_log, norm.weight, D, out_proj), so state dicts move between the
two unchanged. Every weight the forward reads comes from `mixer_weights()` (the adapter hook)
and every op goes through `mamba_ft.ops`. Layout, as transformers and mamba_ssm:
  in_proj -> [gate z (d_inner) | x (d_inner) | B (groups * N) | C (groups * N) | dt (heads)]
  conv1d runs over [x | B | C] (conv_dim channels), then silu
  x splits into heads of head_dim channels; head i reads B and C of group i // (heads / groups)
  SSD scan (dt_bias + softplus + time_step_limit, D skip) -> gated RMSNorm with z -> out_proj
The hybrids' Mamba-2 mixers (docs/models.md) are the same computation, with Falcon-H1's muP
scalings around in_proj and its norm options (none, or norm before the gate) read from the
transformers mixer it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mamba_ft import ops
from mamba_ft.modules.forward_contract import (OUTPUT_ONLY_KEYWORDS, one_cache,
                                               refuse_recording_cache, refuse_unknown_keywords)
from mamba_ft.modules.gated_rms_norm import MambaFTRMSNormGated
from mamba_ft.modules.quantized import projection_weight
from mamba_ft.ops import projections
from mamba_ft.ops.projections import LowRankPath, QuantizedWeight


@dataclass
class Mamba2MixerWeights:
    """The tensors one Mamba-2 mixer forward reads, after any adapter has been applied.

    `in_proj_lora` / `out_proj_lora` carry an optional low-rank side path (rows (..., in) ->
    (..., out)) for the two big projections, added to their outputs (docs/adapters.md).
    `in_proj_weight` / `out_proj_weight` are quantised (`QuantizedWeight`) when the model's base
    is (docs/quantization.md).
    """

    in_proj_weight: torch.Tensor | QuantizedWeight  # (2 * d_inner + 2 * groups * N + heads, hidden)
    in_proj_bias: torch.Tensor | None
    conv_weight: torch.Tensor  # (conv_dim, width)
    conv_bias: torch.Tensor | None
    dt_bias: torch.Tensor  # (heads,)
    A_log: torch.Tensor  # (heads,)
    D: torch.Tensor  # (heads,)
    norm_weight: torch.Tensor | None  # (d_inner,); None for a mixer without a gated norm
    out_proj_weight: torch.Tensor | QuantizedWeight  # (hidden, d_inner)
    out_proj_bias: torch.Tensor | None
    in_proj_lora: LowRankPath | None = None
    out_proj_lora: LowRankPath | None = None


def _mask_padding(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    # transformers' rule (zero the padded positions of (batch, L, channels) tensors before
    # in_proj and after the conv), so padded batches give the same numbers on both.
    if attention_mask is None:
        return x
    return (x * attention_mask[:, :, None]).to(x.dtype)


class MambaFTMamba2Mixer(nn.Module):
    """Drop-in for transformers' `Mamba2Mixer` (same parameters, same forward signature)."""

    def __init__(self, hf_mixer: nn.Module):
        super().__init__()
        # Take over the modules and parameters of the transformers mixer (no copies), so a
        # model loaded by transformers keeps its tensors and its state_dict keys.
        self.layer_idx = hf_mixer.layer_idx
        self.hidden_size = hf_mixer.hidden_size
        self.intermediate_size = hf_mixer.intermediate_size
        self.num_heads = hf_mixer.num_heads
        self.head_dim = hf_mixer.head_dim
        self.n_groups = hf_mixer.n_groups
        self.ssm_state_size = hf_mixer.ssm_state_size
        self.conv_kernel_size = hf_mixer.conv_kernel_size
        self.conv_dim = hf_mixer.conv_dim
        self.chunk_size = hf_mixer.chunk_size
        self.time_step_limit = tuple(hf_mixer.time_step_limit)
        if hf_mixer.activation not in ("silu", "swish"):
            raise ValueError(f"mamba-ft's Mamba-2 mixer supports hidden_act 'silu' only, not "
                             f"{hf_mixer.activation!r}")
        if self.num_heads * self.head_dim != self.intermediate_size:
            raise ValueError(f"num_heads * head_dim ({self.num_heads} * {self.head_dim}) must "
                             f"equal the intermediate size {self.intermediate_size}")
        # Registration order as in transformers, so named_parameters() lists the same order.
        self.conv1d = hf_mixer.conv1d
        self.in_proj = hf_mixer.in_proj
        self.dt_bias = hf_mixer.dt_bias
        self.A_log = hf_mixer.A_log
        # Falcon-H1 may have no norm at all (mamba_rms_norm false: y * silu(z)).
        self.norm = (MambaFTRMSNormGated(hf_mixer.norm)
                     if getattr(hf_mixer.norm, "weight", None) is not None else None)
        self.D = hf_mixer.D
        self.out_proj = hf_mixer.out_proj
        # Set by adapters; None means the raw weights are used.
        self.adapter: nn.Module | None = None
        # Set by `mamba_ft.models.document_starts` for packed batches: (batch, L) bool.
        self.document_starts: torch.Tensor | None = None
        # Set by `mamba_ft.models.set_recompute_ssm`: run conv -> scan again in the backward
        # instead of storing its activations.
        self.recompute_ssm = False
        # Set by the swap from the model type's entry (`mamba_ft.models.model_types`): keywords
        # that model's blocks pass and a mixer has no use for.
        self.ignored_keywords: frozenset[str] = frozenset()
        # Falcon-H1's muP scalings: the input is scaled before in_proj, and in_proj's output
        # by a fixed per-row vector (a buffer the model fills; not in the state dict).
        self.input_multiplier = float(getattr(hf_mixer, "ssm_in_multiplier", 1.0))
        self.register_buffer("mup_vector", getattr(hf_mixer, "mup_vector", None), persistent=False)

    def raw_weights(self) -> Mamba2MixerWeights:
        return Mamba2MixerWeights(
            in_proj_weight=projection_weight(self.in_proj),
            in_proj_bias=self.in_proj.bias,
            conv_weight=self.conv1d.weight.squeeze(1),
            conv_bias=self.conv1d.bias,
            dt_bias=self.dt_bias,
            A_log=self.A_log,
            D=self.D,
            norm_weight=None if self.norm is None else self.norm.weight,
            out_proj_weight=projection_weight(self.out_proj),
            out_proj_bias=self.out_proj.bias,
        )

    def mixer_weights(self) -> Mamba2MixerWeights:
        """The weights this forward reads: raw, or with the attached adapter applied."""
        weights = self.raw_weights()
        return weights if self.adapter is None else self.adapter(weights)

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, *,
                cache_params=None, **unexpected):
        """transformers' `Mamba2Mixer.forward`: the cache arrives as `cache` or
        `cache_params`. `Mamba2Block` (and the hybrids' blocks) pass the model's keywords on:
        the output-only ones (`forward_contract.OUTPUT_ONLY_KEYWORDS`) and the model type's
        `ignored_keywords` are ignored, any other is an error, not dropped (transformers' own
        mixer hands them to kernels that drop what they do not know, `seq_idx` included on its
        PyTorch path)."""
        cache = one_cache(type(self).__name__, cache, cache_params)
        refuse_unknown_keywords(type(self).__name__, unexpected,
                                OUTPUT_ONLY_KEYWORDS | self.ignored_keywords)
        refuse_recording_cache(cache, self.layer_idx)
        w = self.mixer_weights()
        batch, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype

        conv_window = ssm_state = None
        if cache is not None:
            conv_window = cache.get_conv_state(self.layer_idx)  # the last `width` conv inputs
            ssm_state = cache.get_recurrent_state(self.layer_idx)

        hidden_states = _mask_padding(hidden_states, attention_mask)
        if self.input_multiplier != 1.0:
            hidden_states = hidden_states * self.input_multiplier
        projected = projections.rows(hidden_states, w.in_proj_weight, w.in_proj_bias,
                                     w.in_proj_lora)
        if self.mup_vector is not None:
            projected = projected * self.mup_vector.to(projected.dtype)
        gate, xBC, dt = projected.split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        A = -torch.exp(w.A_log.float())

        if (conv_window is not None and ssm_state is not None and seq_len == 1
                and self.document_starts is None):
            y = self._decode_step(xBC[:, 0], dt[:, 0], w, A, conv_window, ssm_state, cache,
                                  attention_mask)
        else:
            # The cache updates its window in place below; keep the width - 1 inputs this call
            # starts from.
            conv_state = None if conv_window is None else conv_window[..., 1:].clone()
            # The conv takes (batch, channels, L) and reads it through strides: a transposed
            # view of the rows, so the conv's input, output and gradients all stay in the
            # rows' layout (contiguous along channels), which is also the layout the SSD reads
            # x, B and C in. Transposed in memory, the conv's backward read its gradient across
            # the grain and the backward concatenated strided tensors: the largest items of
            # the Mamba-2-130m step profile (docs/benchmarks.md).
            xBC = xBC.transpose(1, 2)
            if cache is not None:
                # Stores the last `width` conv inputs for the next step (transformers' layout).
                cache.update_conv_state(xBC, self.layer_idx,
                                        conv_kernel_size=self.conv_kernel_size)
            if self.recompute_ssm and cache is None and torch.is_grad_enabled():
                # Keep only in_proj's output for the backward and run conv -> scan again there.
                # The branch draws no random numbers, so no RNG state needs saving.
                y = checkpoint(self._ssm_branch, xBC, dt, w, A, None, None, attention_mask,
                               use_reentrant=False, preserve_rng_state=False)
            else:
                y = self._ssm_branch(xBC, dt, w, A, conv_state, ssm_state, attention_mask,
                                     cache)
        if self.norm is None:
            y = y * F.silu(gate.float()).to(y.dtype)
        else:
            y = ops.gated_rms_norm(y, gate, w.norm_weight, self.norm.variance_epsilon,
                                   self.norm.group_size, self.norm.norm_before_gate)
        return projections.rows(y.to(dtype), w.out_proj_weight, w.out_proj_bias, w.out_proj_lora)

    def _split_heads(self, xBC: torch.Tensor):
        """(..., conv_dim) -> x (..., heads, head_dim), B and C (..., groups, N)."""
        GN = self.n_groups * self.ssm_state_size
        x, B, C = xBC.split([self.intermediate_size, GN, GN], dim=-1)
        prefix = xBC.shape[:-1]
        return (x.reshape(*prefix, self.num_heads, self.head_dim),
                B.reshape(*prefix, self.n_groups, self.ssm_state_size),
                C.reshape(*prefix, self.n_groups, self.ssm_state_size))

    def _ssm_branch(self, xBC, dt, w: Mamba2MixerWeights, A, conv_state, ssm_state,
                    attention_mask, cache=None):
        """conv over (batch, conv_dim, L) -> SSD scan; returns (batch, L, d_inner)."""
        batch, _, seq_len = xBC.shape
        xBC = ops.causal_conv1d(xBC, w.conv_weight, w.conv_bias, initial_state=conv_state,
                                reset=self.document_starts)
        xBC = _mask_padding(xBC.transpose(1, 2), attention_mask)
        x, B, C = self._split_heads(xBC)
        result = ops.mamba_chunk_scan_combined(
            x, dt, A, B, C, self.chunk_size, D=w.D, dt_bias=w.dt_bias,
            initial_states=ssm_state, dt_softplus=True, dt_limit=self.time_step_limit,
            return_final_states=cache is not None, reset=self.document_starts,
        )
        if cache is not None:
            result, last_state = result
            cache.update_recurrent_state(last_state, self.layer_idx)
        return result.reshape(batch, seq_len, self.intermediate_size)

    def _decode_step(self, xBC, dt, w: Mamba2MixerWeights, A, conv_window, ssm_state, cache,
                     attention_mask):
        """One token with the cache: conv window and SSD state advance by one. The conv reads
        the window before the cache shifts it, and the new state is written into the cache's
        own tensor where it can be: no copies (a CUDA-graph step replays each one)."""
        x_conv, _ = ops.causal_conv1d_step(xBC, conv_window[..., 1:], w.conv_weight, w.conv_bias)
        cache.update_conv_state(xBC.unsqueeze(-1), self.layer_idx)
        xBC = _mask_padding(x_conv.unsqueeze(1), attention_mask)[:, 0]
        x, B, C = self._split_heads(xBC)
        y, new_state = ops.ssd_state_step(ssm_state, x, dt, A, B, C, D=w.D, dt_bias=w.dt_bias,
                                          dt_softplus=True, dt_limit=self.time_step_limit,
                                          out=ssm_state)
        cache.update_recurrent_state(new_state, self.layer_idx)  # itself: no copy
        return y.reshape(xBC.shape[0], 1, self.intermediate_size)
