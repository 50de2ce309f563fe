"""The original mamba_ssm checkpoint format, converted on load into transformers' Mamba.

A mamba_ssm directory has a config.json with `d_model`, `n_layer`, `vocab_size`, `ssm_cfg`,
`pad_vocab_size_multiple`, ... and weights in pytorch_model.bin whose keys start with
`backbone.embedding.weight`. The tensors are the same as transformers' except for that one
name (`embedding` -> `embeddings`), and the vocabulary is padded to a multiple of
`pad_vocab_size_multiple`, which the converted config keeps so every row loads.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import MambaConfig, MambaForCausalLM

from mamba_ft.errors import UserError

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_mamba_ssm_config(raw: dict) -> bool:
    return "d_model" in raw and "n_layer" in raw


def mamba_config_from_ssm(raw: dict, where: str) -> MambaConfig:
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise UserError(f"{where} holds a {layer} model; mamba-ft converts Mamba-1 checkpoints only.")
    if raw.get("d_intermediate", 0):
        raise UserError(f"{where} has MLP blocks (d_intermediate={raw['d_intermediate']}), which "
                        f"transformers' Mamba cannot hold; only pure Mamba-1 stacks convert.")
    if raw.get("attn_layer_idx"):
        raise UserError(f"{where} has attention layers (attn_layer_idx); only pure Mamba-1 stacks convert.")
    if not raw.get("rms_norm", True):
        raise UserError(f"{where} uses LayerNorm (rms_norm: false); transformers' Mamba has RMSNorm only.")
    d_model = raw["d_model"]
    vocab = raw.get("vocab_size", 50277)
    multiple = raw.get("pad_vocab_size_multiple", 8)
    if vocab % multiple:
        vocab += multiple - vocab % multiple
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


def load_mamba_ssm_dir(path: Path, raw: dict, dtype: torch.dtype) -> MambaForCausalLM:
    config = mamba_config_from_ssm(raw, str(path))
    state = convert_ssm_state_dict(read_ssm_state_dict(path))
    model = MambaForCausalLM(config)
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
