"""mamba-ft's Mamba-1 mixer: transformers' `MambaMixer` parameters, mamba-ft's ops.

The module owns exactly the parameters transformers' mixer owns, under the same names
(in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so state dicts move between the two
unchanged. What differs is the forward: every weight the computation reads comes from
`mixer_weights()`, one place where adapters (see `mamba_ft.adapters`) substitute effective
weights, and every op goes through `mamba_ft.ops`, which picks the fused kernels on CUDA.

The forward is in_proj -> conv -> selective SSM (x_proj -> dt_proj -> gated scan) -> out_proj;
`_selective_ssm` / `_selective_step` are the SSM over one set of channels, the one place a
variant that splits the channels into heads (Zamba's, `zamba_mixer.py`) runs per head.
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
from mamba_ft.modules.quantized import dense_weight, projection_weight
from mamba_ft.ops.projections import (LowRankPath, QuantizedWeight, channels_first,
                                      channels_first_to_rows, rows_to_channels_first)


@dataclass
class MixerWeights:
    """The tensors one mixer forward reads, after any adapter has been applied.

    `in_proj_lora` / `out_proj_lora` carry an optional low-rank side path (x -> x @ A^T @ B^T * s)
    for the two big projections, where adding it to the activations is cheaper than merging it
    into the weight.

    `in_proj_weight` / `out_proj_weight` are quantised (`QuantizedWeight`) when the model's base
    is (`mamba_ft.models.quantize`): the projections' GEMMs dequantise them as they run. Every
    other field is a tensor.

    Shapes are the mixer's own: x_proj (R + 2N, d_inner), dt_proj (d_inner, R), dt_bias and D
    (d_inner,), A_log (d_inner, N); a mixer with SSM heads (Zamba's) stacks each per head, with
    a leading heads axis and head_dim in place of d_inner.
    """

    in_proj_weight: torch.Tensor | QuantizedWeight
    in_proj_bias: torch.Tensor | None
    conv_weight: torch.Tensor  # (d_inner, width)
    conv_bias: torch.Tensor | None
    x_proj_weight: torch.Tensor
    dt_proj_weight: torch.Tensor
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor
    out_proj_weight: torch.Tensor | QuantizedWeight
    out_proj_bias: torch.Tensor | None
    in_proj_lora: LowRankPath | None = None
    out_proj_lora: LowRankPath | None = None


def _mask_padding(x: torch.Tensor, attention_mask: torch.Tensor | None, time_dim: int):
    # Same rule as transformers (zero the padded positions), so padded batches give the same
    # numbers on both implementations. x is (batch, L, d) (time_dim 1) or (batch, d, L) (2).
    if attention_mask is None:
        return x
    mask = attention_mask.unsqueeze(3 - time_dim)
    return (x * mask).to(x.dtype)


def _weightless_rms(t: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """t / rms(t) along `dim`, in fp32, back in t's dtype (FalconMamba's B, C and dt norms)."""
    t32 = t.float()
    return (t32 * torch.rsqrt(t32.pow(2).mean(dim, keepdim=True) + eps)).to(t.dtype)


class MambaFTMixer(nn.Module):
    """Drop-in for transformers' `MambaMixer` (same parameters, same forward signature)."""

    # One SSM over all d_inner channels; a variant on heads (Zamba's) says how many, and holds
    # x_proj, dt_proj, dt_bias, A_log and D stacked per head.
    n_heads: int | None = None

    def __init__(self, hf_mixer: nn.Module):
        super().__init__()
        # Take over the modules and parameters of the transformers mixer (no copies), so a
        # model loaded by transformers keeps its tensors and its state_dict keys.
        self.layer_idx = hf_mixer.layer_idx
        self.hidden_size = hf_mixer.hidden_size
        self.intermediate_size = hf_mixer.intermediate_size
        self.ssm_state_size = hf_mixer.ssm_state_size
        self.time_step_rank = hf_mixer.time_step_rank
        self.conv_kernel_size = hf_mixer.conv_kernel_size
        if hf_mixer.activation not in ("silu", "swish"):
            raise ValueError(
                f"mamba-ft's mixer supports hidden_act 'silu' only, not {hf_mixer.activation!r}"
            )
        self._take_parameters(hf_mixer)
        # Set by adapters.attach_adapters(); None means the raw weights are used.
        self.adapter: nn.Module | None = None
        # Set by `mamba_ft.models.document_starts` for packed batches: (batch, L) bool.
        self.document_starts: torch.Tensor | None = None
        # Set by `mamba_ft.models.set_recompute_ssm`: trade one more forward of the SSM
        # branch in the backward for not storing its activations.
        self.recompute_ssm = False
        # Set by the swap from the model type's entry (`mamba_ft.models.model_types`): keywords
        # that model's blocks pass and a mixer has no use for.
        self.ignored_keywords: frozenset[str] = frozenset()
        # FalconMamba normalises dt, B and C (RMS over each position's R, N, N values, no
        # weight) before the scan; its mixer carries the epsilon, plain Mamba's does not.
        self.bcdt_rms_eps: float | None = getattr(hf_mixer, "rms_eps", None)
        # Jamba normalises them with RMSNorms of their own, whose weights are in the state dict:
        # kept under transformers' names (after out_proj, as transformers registers them).
        if hasattr(hf_mixer, "dt_layernorm") and self.bcdt_rms_eps is None:
            self.dt_layernorm = hf_mixer.dt_layernorm
            self.b_layernorm = hf_mixer.b_layernorm
            self.c_layernorm = hf_mixer.c_layernorm
        else:
            self.dt_layernorm = self.b_layernorm = self.c_layernorm = None

    def _take_parameters(self, hf_mixer: nn.Module) -> None:
        # Registration order as in transformers, so named_parameters() lists the same order.
        self.conv1d = hf_mixer.conv1d
        self.in_proj = hf_mixer.in_proj
        self.x_proj = hf_mixer.x_proj
        self.dt_proj = hf_mixer.dt_proj
        self.A_log = hf_mixer.A_log
        self.D = hf_mixer.D
        self.out_proj = hf_mixer.out_proj

    def _ssm_projection_parameters(self) -> dict[str, nn.Parameter]:
        """x_proj's and dt_proj's weights and dt's bias, by adapter target name: the parameters
        where mixer variants differ (Zamba keeps them raw and per head)."""
        return {"x_proj": self.x_proj.weight, "dt_proj": self.dt_proj.weight,
                "dt_bias": self.dt_proj.bias}

    def _ssm_projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_proj's and dt_proj's weights and dt's bias as the forward reads them. The small
        projections are quantised only in some pre-quantised checkpoints; then their
        dequantised matrix."""
        return dense_weight(self.x_proj), dense_weight(self.dt_proj), self.dt_proj.bias

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """The parameter each adapter target changes (merging adds its delta there), by target
        name, in this mixer's layout (conv1d's weight is (d_inner, 1, width))."""
        return {"in_proj": self.in_proj.weight, "conv1d": self.conv1d.weight,
                **self._ssm_projection_parameters(), "A_log": self.A_log, "D": self.D,
                "out_proj": self.out_proj.weight}

    def raw_weights(self) -> MixerWeights:
        # A bitsandbytes-quantised projection's .weight is packed bytes, never a matrix to read:
        # the big projections hand over a dequantise-in-the-GEMM weight.
        x_proj_weight, dt_proj_weight, dt_bias = self._ssm_projection_weights()
        return MixerWeights(
            in_proj_weight=projection_weight(self.in_proj),
            in_proj_bias=self.in_proj.bias,
            conv_weight=self.conv1d.weight.squeeze(1),
            conv_bias=self.conv1d.bias,
            x_proj_weight=x_proj_weight,
            dt_proj_weight=dt_proj_weight,
            dt_bias=dt_bias,
            A_log=self.A_log,
            D=self.D,
            out_proj_weight=projection_weight(self.out_proj),
            out_proj_bias=self.out_proj.bias,
        )

    def mixer_weights(self) -> MixerWeights:
        """The weights this forward reads: raw, or with the attached adapter applied."""
        weights = self.raw_weights()
        return weights if self.adapter is None else self.adapter(weights)

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, *,
                cache_params=None, **unexpected):
        """transformers' `MambaMixer.forward`: the cache arrives as `cache` (transformers 5.24
        and later) or `cache_params` (5.23). Blocks that hand the mixer the model's keywords
        (Zamba's) may pass the output-only ones (`forward_contract.OUTPUT_ONLY_KEYWORDS`),
        which are ignored, as are the model type's `ignored_keywords`; any other keyword is an
        error, not ignored: a keyword swallowed here once made every decoding step start from
        an empty state."""
        owner = type(self).__name__
        cache_params = one_cache(owner, cache, cache_params)
        refuse_unknown_keywords(owner, unexpected, OUTPUT_ONLY_KEYWORDS | self.ignored_keywords)
        refuse_recording_cache(cache_params, self.layer_idx)
        w = self.mixer_weights()
        seq_len = hidden_states.shape[1]

        conv_window = ssm_state = None
        if cache_params is not None:
            conv_window = cache_params.get_conv_state(self.layer_idx)  # the last `width` inputs
            ssm_state = cache_params.get_recurrent_state(self.layer_idx)

        hidden_states = _mask_padding(hidden_states, attention_mask, time_dim=1)
        xz = rows_to_channels_first(hidden_states, w.in_proj_weight, w.in_proj_bias,
                                    w.in_proj_lora)
        x, z = self._split_xz(xz)  # (batch, d_inner, L) each, time-contiguous
        A = -torch.exp(w.A_log.float())

        if conv_window is not None and ssm_state is not None and seq_len == 1:
            y = self._decode_step(x[..., 0], z[..., 0], w, A, conv_window, ssm_state, cache_params)
            return channels_first_to_rows(y.unsqueeze(2), w.out_proj_weight, w.out_proj_bias,
                                          w.out_proj_lora)
        # The cache updates its window in place below; keep the width - 1 inputs this call
        # starts from.
        conv_state = None if conv_window is None else conv_window[..., 1:].clone()
        if cache_params is not None:
            # Stores the last `width` inputs for the next step (transformers' layout).
            cache_params.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        if self.recompute_ssm and cache_params is None and torch.is_grad_enabled():
            # Keep only xz for the backward and run conv -> x_proj -> dt_proj -> scan again
            # there: saves the conv output, delta, B, C and the scan's checkpoints of every
            # layer for one more forward of that branch. The branch draws no random numbers
            # (adapter dropout acts outside it), so no RNG state needs saving for the recompute.
            y = checkpoint(self._ssm_branch, x, z, w, A, None, None, attention_mask,
                           use_reentrant=False, preserve_rng_state=False)
        else:
            y = self._ssm_branch(x, z, w, A, conv_state, ssm_state, attention_mask, cache_params)
        return channels_first_to_rows(y, w.out_proj_weight, w.out_proj_bias, w.out_proj_lora)

    def _split_xz(self, xz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """in_proj's output (batch, 2 d_inner, L) -> x, z: Mamba-1's rows are [x | z]."""
        return xz.chunk(2, dim=1)

    def _ssm_branch(self, x, z, w: MixerWeights, A, conv_state, ssm_state, attention_mask,
                    cache_params=None):
        """conv -> x_proj -> dt_proj -> gated scan over (batch, d_inner, L); same layout out."""
        x = ops.causal_conv1d(x, w.conv_weight, w.conv_bias, initial_state=conv_state,
                              reset=self.document_starts)
        x = _mask_padding(x, attention_mask, time_dim=2)
        result = self._selective_ssm(x, z, w, A, ssm_state, cache_params is not None)
        if cache_params is not None:
            result, last_state = result
            cache_params.update_recurrent_state(last_state, self.layer_idx)
        return result

    def _selective_ssm(self, x, z, w: MixerWeights, A, ssm_state, return_last_state: bool):
        """x_proj -> dt_proj -> gated scan of the conv output x (batch, d, L); y in the same
        layout, and the final state (batch, d, N) when asked. `w`'s x_proj, dt_proj, dt_bias
        and D and `A` are those of these d channels."""
        R, N = self.time_step_rank, self.ssm_state_size
        # All (batch, channels, L), time-contiguous: B and C are views of x_proj's output in
        # the layout the scan reads. dt_proj's bias is added inside the scan, in fp32, with
        # the softplus.
        dt, B, C = torch.split(channels_first(x, w.x_proj_weight), [R, N, N], dim=1)
        dt, B, C = self._normalize_dt_B_C(dt, B, C, dim=1)
        delta = channels_first(dt, w.dt_proj_weight)
        return ops.selective_scan(
            x, delta, A, B, C,
            D=w.D.float(), z=z, delta_bias=w.dt_bias.float(), delta_softplus=True,
            initial_state=ssm_state, reset=self.document_starts,
            return_last_state=return_last_state,
        )

    def _normalize_dt_B_C(self, dt, B, C, dim: int):
        """FalconMamba's weightless or Jamba's weighted RMS norms of dt, B and C over their
        channels (axis `dim`); plain Mamba has neither."""
        if self.bcdt_rms_eps is not None:
            return tuple(_weightless_rms(t, dim, self.bcdt_rms_eps) for t in (dt, B, C))
        if self.dt_layernorm is None:
            return dt, B, C
        # transformers' norms act on the last axis: move the channels there and back.
        return tuple(norm(t.movedim(dim, -1)).movedim(-1, dim) for norm, t in
                     ((self.dt_layernorm, dt), (self.b_layernorm, B), (self.c_layernorm, C)))

    def _decode_step(self, x, z, w: MixerWeights, A, conv_window, ssm_state, cache_params):
        """One token with the cache: conv window and recurrent state advance by one. The conv
        reads the window before the cache shifts it, and the new state is written into the
        cache's own tensor where it can be: no copies (a CUDA-graph step replays each one)."""
        x_conv, _ = ops.causal_conv1d_step(x, conv_window[..., 1:], w.conv_weight, w.conv_bias)
        cache_params.update_conv_state(x.unsqueeze(-1), self.layer_idx)
        y, new_state = self._selective_step(x_conv, z, w, A, ssm_state, out=ssm_state)
        cache_params.update_recurrent_state(new_state, self.layer_idx)  # itself: no copy
        return y

    def _selective_step(self, x, z, w: MixerWeights, A, ssm_state, out=None):
        """`_selective_ssm` for one token: x, z (batch, d), state (batch, d, N) -> (y, new
        state), the new state written into `out` if given. D and the dt bias are read in
        fp32 by the step itself."""
        R, N = self.time_step_rank, self.ssm_state_size
        dt, B, C = torch.split(F.linear(x, w.x_proj_weight), [R, N, N], dim=-1)
        dt, B, C = self._normalize_dt_B_C(dt, B, C, dim=-1)
        delta = F.linear(dt, w.dt_proj_weight)
        return ops.selective_state_step(
            ssm_state, x, delta, A, B, C, D=w.D, z=z, delta_bias=w.dt_bias,
            delta_softplus=True, out=out,
        )
