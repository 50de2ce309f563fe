"""The original mamba_ssm checkpoint format, converted on load into transformers' Mamba or Mamba-2.

A mamba_ssm directory has a config.json with `d_model`, `n_layer`, `vocab_size`, `ssm_cfg`,
`pad_vocab_size_multiple`, ... and weights in pytorch_model.bin whose keys start with
`backbone.embedding.weight`. `ssm_cfg.layer` names the mixer: Mamba1 (the default) becomes
transformers' MambaForCausalLM, Mamba2 its Mamba2ForCausalLM. For both, the tensors are the
same as transformers' (Mamba2's mixer: in_proj [z | x | B | C | dt], conv1d, dt_bias, A_log, D,
norm.weight, out_proj, under the same names) except for one name (`embedding` ->
`embeddings`), and the vocabulary is padded to a multiple of `pad_vocab_size_multiple`, which
the converted config keeps so every row loads.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from mamba_ft.errors import UserError

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_mamba_ssm_config(raw: dict) -> bool:
    return "d_model" in raw and "n_layer" in raw


def _layer(raw: dict) -> str:
    return (raw.get("ssm_cfg") or {}).get("layer", "Mamba1")


def config_from_ssm(raw: dict, where: str) -> MambaConfig | Mamba2Config:
    """The transformers config for a mamba_ssm config.json, by its `ssm_cfg.layer`."""
    layer = _layer(raw)
    if layer == "Mamba1":
        return mamba_config_from_ssm(raw, where)
    if layer == "Mamba2":
        return mamba2_config_from_ssm(raw, where)
    raise UserError(f"{where} holds a {layer} model; mamba-ft converts mamba_ssm checkpoints "
                    f"whose ssm_cfg.layer is Mamba1 or Mamba2.")


def _check_pure_stack(raw: dict, where: str, family: str) -> None:
    if raw.get("d_intermediate", 0):
        raise UserError(f"{where} has MLP blocks (d_intermediate={raw['d_intermediate']}), which "
                        f"transformers' {family} cannot hold; only pure {family} stacks convert.")
    if raw.get("attn_layer_idx"):
        raise UserError(f"{where} has attention layers (attn_layer_idx); only pure {family} "
                        f"stacks convert.")
    if not raw.get("rms_norm", True):
        raise UserError(f"{where} uses LayerNorm (rms_norm: false); transformers' {family} has "
                        f"RMSNorm only.")


def _padded_vocab(raw: dict) -> int:
    vocab = raw.get("vocab_size", 50277)
    multiple = raw.get("pad_vocab_size_multiple", 8)
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    return vocab


def mamba_config_from_ssm(raw: dict, where: str) -> MambaConfig:
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise UserError(f"{where} holds a {layer} model, not a Mamba1 one; use config_from_ssm.")
    _check_pure_stack(raw, where, "Mamba-1")
    d_model = raw["d_model"]
    vocab = _padded_vocab(raw)
    dt_rank = ssm_cfg.get("dt_rank", "auto")
    return MambaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=raw["n_layer"],
        state_size=ssm_cfg.get("d_state", 16),
        conv_kernel=ssm_cfg.get("d_conv", 4),
        expand=ssm_cfg.get("expand", 2),
        time_step_rank=math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
        use_bias=ssm_cfg.get("bias", False),
        use_conv_bias=ssm_cfg.get("conv_bias", True),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        layer_norm_epsilon=raw.get("norm_epsilon", 1e-5),
        tie_word_embeddings=raw.get("tie_embeddings", True),
    )


# mamba_ssm's Mamba2 arguments that only choose an initialisation or an implementation: the
# weights mean the same whatever they are. Any key outside these and the ones read below is
# refused, so a variant mamba-ft has not seen never converts into a different model.
_MAMBA2_INIT_ONLY = {"A_init_range", "dt_min", "dt_max", "dt_init_floor", "conv_init",
                     "use_mem_eff_path", "layer_idx", "process_group", "sequence_parallel",
                     "device", "dtype"}
_MAMBA2_READ = {"d_state", "d_conv", "expand", "headdim", "d_ssm", "ngroups", "D_has_hdim",
                "rmsnorm", "norm_before_gate", "dt_limit", "bias", "conv_bias", "chunk_size"}
# mamba_ssm's Mamba2 builds its gated RMSNorm with eps 1e-5 whatever norm_epsilon says;
# transformers' Mamba2 uses layer_norm_epsilon for it and for the block norms alike.
_MAMBA2_GATED_NORM_EPS = 1e-5


def mamba2_config_from_ssm(raw: dict, where: str) -> Mamba2Config:
    """transformers' Mamba2Config for a mamba_ssm config with `ssm_cfg.layer: Mamba2`.

    Refuses what transformers' Mamba2 cannot compute the same way: a partial SSM (d_ssm below
    expand * d_model, the rest a gated MLP), D per channel (D_has_hdim), no gated norm or the
    norm before the gate, and a norm_epsilon other than the gated norm's fixed 1e-5.
    """
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    ssm_cfg.pop("layer", None)
    unknown = sorted(set(ssm_cfg) - _MAMBA2_READ - _MAMBA2_INIT_ONLY)
    if unknown:
        raise UserError(f"{where} has ssm_cfg keys mamba-ft does not know for Mamba2 "
                        f"({', '.join(unknown)}); convert it to transformers' Mamba2 format "
                        f"and pass that directory.")
    _check_pure_stack(raw, where, "Mamba-2")
    d_model = raw["d_model"]
    expand = ssm_cfg.get("expand", 2)
    headdim = ssm_cfg.get("headdim", 64)
    d_inner = expand * d_model
    d_ssm = ssm_cfg.get("d_ssm")
    if d_ssm is not None and d_ssm != d_inner:
        raise UserError(f"{where} runs the SSM on d_ssm={d_ssm} of {d_inner} channels (the rest "
                        f"a gated MLP), which transformers' Mamba2 cannot hold.")
    if d_inner % headdim:
        raise UserError(f"{where}: expand * d_model ({d_inner}) is not a multiple of headdim "
                        f"({headdim}); the config is inconsistent.")
    if ssm_cfg.get("D_has_hdim", False):
        raise UserError(f"{where} has a D per channel (D_has_hdim: true); transformers' Mamba2 "
                        f"has one D per head.")
    if not ssm_cfg.get("rmsnorm", True) or ssm_cfg.get("norm_before_gate", False):
        raise UserError(f"{where} has no gated RMSNorm or applies it before the gate; "
                        f"transformers' Mamba2 gates, then normalises.")
    eps = raw.get("norm_epsilon", 1e-5)
    if eps != _MAMBA2_GATED_NORM_EPS:
        raise UserError(f"{where} has norm_epsilon {eps}, but mamba_ssm's gated norm uses 1e-5 "
                        f"and transformers' Mamba2 one epsilon for all norms; it cannot be "
                        f"converted exactly.")
    return Mamba2Config(
        vocab_size=_padded_vocab(raw),
        hidden_size=d_model,
        num_hidden_layers=raw["n_layer"],
        state_size=ssm_cfg.get("d_state", 128),
        conv_kernel=ssm_cfg.get("d_conv", 4),
        expand=expand,
        head_dim=headdim,
        num_heads=d_inner // headdim,
        n_groups=ssm_cfg.get("ngroups", 1),
        use_bias=ssm_cfg.get("bias", False),
        use_conv_bias=ssm_cfg.get("conv_bias", True),
        chunk_size=ssm_cfg.get("chunk_size", 256),
        time_step_limit=tuple(ssm_cfg.get("dt_limit", (0.0, float("inf")))),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        layer_norm_epsilon=eps,
        tie_word_embeddings=raw.get("tie_embeddings", True),
    )


def unsafe_pickle_message(where: str) -> str:
    # torch's own message advises weights_only=False, which would run the file's code.
    return (f"The weights in {where} are a pickle that would run code when loaded (it holds "
            f"objects other than tensors); mamba-ft loads only safetensors or weights-only "
            f"tensor files; if you trust its origin, convert it once: load it "
            f"where running its code is acceptable and save the tensors with safetensors' save_file (or "
            f"save_pretrained(..., safe_serialization=True)), then pass that directory.")


def read_ssm_state_dict(path: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        file = path / name
        if file.exists():
            try:
                if name.endswith(".safetensors"):
                    return load_file(str(file))
                return torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                raise UserError(unsafe_pickle_message(str(file))) from None
            except Exception as exc:  # corrupt or truncated files raise many types
                raise UserError(f"Could not read the weights {file}: {exc}. The file is damaged or "
                                f"not a checkpoint; download it again.") from None
    raise UserError(f"{path} has a mamba_ssm config.json but no weights ({' or '.join(_WEIGHT_FILES)}).")


def convert_ssm_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.replace("backbone.embedding.", "backbone.embeddings."): value for key, value in state.items()}


def load_mamba_ssm_dir(path: Path, raw: dict,
                      dtype: torch.dtype) -> MambaForCausalLM | Mamba2ForCausalLM:
    config = config_from_ssm(raw, str(path))
    state = convert_ssm_state_dict(read_ssm_state_dict(path))
    model = (Mamba2ForCausalLM if isinstance(config, Mamba2Config) else MambaForCausalLM)(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("backbone.embeddings.weight"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k] is not None and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        detail = (f"shape mismatch {wrong[0]}" if wrong else
                  f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise UserError(f"The weights in {path} do not fit its config.json ({detail}); the config "
                        f"and the weights come from different models.")
    model.load_state_dict(state)
    return model.to(dtype)
