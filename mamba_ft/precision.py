"""Mixed-precision policy: what autocasts, what stays fp32, loss scaling, tf32.

Training keeps fp32 master weights and runs the forward under Accelerate's autocast (bf16 or
fp16). The parameters that drive the recurrence (A_log, D, the dt bias), the norms and every
adapter weight must stay fp32: SSMs are sensitive to their recurrent dynamics, and a bf16
adapter update of size lr * grad vanishes against the base weight. `enforce_fp32` checks that
and casts them back if a model arrived in half precision. fp16 uses Accelerate's dynamic loss
scaling (a GradScaler); a step whose gradients overflowed is skipped by the scaler and counted
here so it shows up in the metrics.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mamba_ft.errors import UserError

# Parameter names (as in transformers' Mamba / GPT-NeoX and mamba-ft adapters) kept in fp32.
FP32_PARAMS = re.compile(
    r"(\.A_log$|\.D$|dt_proj\.bias$|dt_bias$|norm[^.]*\.(weight|bias)$|norm_f\.|layernorm|ln_f\."
    r"|\.adapter\.|lora_)"
)


def mixed_precision_for(mode: str, device: torch.device) -> str:
    """Accelerate's `mixed_precision` value for a recipe's precision.mode on this device."""
    if mode == "fp16" and device.type != "cuda":
        raise UserError("precision.mode fp16 needs a CUDA GPU (loss scaling runs there); on this "
                        "machine use precision.mode: bf16 or fp32.")
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("This GPU has no bf16 support; use precision.mode: fp16 or fp32.")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[mode]


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls on Ampere+ GPUs: ~10 mantissa bits for fp32 matmul inputs, much faster."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def fp32_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters() if FP32_PARAMS.search(name)]


def enforce_fp32(model: nn.Module) -> int:
    """Cast the recurrence parameters, norms and adapter weights to fp32; return how many moved.

    Under AMP every trainable parameter should be fp32 as well (the optimizer updates fp32
    master weights), so trainable half-precision parameters are cast too.
    """
    moved = 0
    for name, param in model.named_parameters():
        keep = FP32_PARAMS.search(name) or param.requires_grad
        if keep and param.dtype != torch.float32:
            param.data = param.data.float()
            moved += 1
    return moved


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen weights in `dtype` (the base model under adapters); return how many moved.

    Parameters that `enforce_fp32` keeps in fp32 (recurrence parameters, norms, adapters) and
    every trainable parameter stay as they are.
    """
    moved = 0
    for name, param in model.named_parameters():
        frozen = not param.requires_grad and param.is_floating_point()
        if frozen and not FP32_PARAMS.search(name) and param.dtype != dtype:
            param.data = param.data.to(dtype)
            moved += 1
    return moved


class SkippedSteps:
    """Counts optimizer steps the fp16 loss scaler skipped because gradients overflowed."""

    def __init__(self):
        self.count = 0

    def update(self, accelerator) -> bool:
        """Call after each real optimizer step; True when that step was skipped."""
        skipped = bool(accelerator.optimizer_step_was_skipped)
        self.count += skipped
        return skipped
