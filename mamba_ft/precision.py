"""The precision policy: what autocasts, what stays fp32, what the frozen base is stored in,
loss scaling, tf32; one object built from the recipe's `precision` section, checked in one
place, applied to the model, and handed to evaluation after training.

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
from dataclasses import dataclass

import torch
from torch import nn

from mamba_ft.errors import UserError

# Parameter names (as in transformers' Mamba / GPT-NeoX and mamba-ft adapters) kept in fp32;
# Zamba's dt bias is a raw parameter, `dt_proj_bias`.
FP32_PARAMS = re.compile(
    r"(\.A_log$|\.D$|dt_proj[._]bias$|dt_bias$|norm[^.]*\.(weight|bias)$|norm_f\.|layernorm|ln_f\."
    r"|\.adapter\.|lora_)"
)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """`mode`: the forward's autocast (fp32: none); `frozen_base`: the dtype the frozen base
    weights are stored in under adapters (the recurrence parameters, norms and adapters stay
    fp32 whatever it says)."""

    mode: str = "fp32"
    frozen_base: str = "fp32"
    tf32: bool = False
    fp16_init_scale: float = 2.0 ** 16

    @classmethod
    def from_section(cls, section) -> PrecisionPolicy:
        return cls(mode=section.mode, frozen_base=section.frozen_base, tf32=section.tf32,
                   fp16_init_scale=section.fp16_init_scale)

    def check(self, *, adapter: bool, merge_at_end: bool, cuda_graphs: bool,
              device: torch.device | None = None, fsdp2: bool = False) -> None:
        """Every constraint on this policy, in one place: the recipe's own (device None, when
        it is validated) and the launch's (the device and whether FSDP2 shards the model)."""
        if self.frozen_base != "fp32" and not adapter:
            raise UserError(f"precision.frozen_base {self.frozen_base} applies to the frozen base "
                            f"under adapters and this recipe trains every weight; set "
                            f"precision.frozen_base: fp32, or add an adapter section.")
        if self.frozen_base != "fp32" and merge_at_end:
            raise UserError(f"run.merge_at_end would merge into base weights that "
                            f"precision.frozen_base keeps in {self.frozen_base}, losing their "
                            f"precision; set run.merge_at_end: false and merge afterwards with "
                            f"`mamba-ft merge OUTPUT_DIR/adapter --out DIR`, which loads the base "
                            f"at full precision.")
        if cuda_graphs and self.mode == "fp16":
            raise UserError("run.cuda_graphs does not run with precision.mode fp16 (its loss scaler "
                            "decides on the host, step by step, whether to skip an update); use "
                            "precision.mode: bf16, or set run.cuda_graphs: false.")
        if fsdp2 and self.mode == "fp16":
            # The loss scaler's overflow check would see only this process's gradient shard, so
            # processes could disagree on skipping a step.
            raise UserError("precision.mode fp16 is not supported with FSDP2; use precision.mode: "
                            "bf16 (no loss scaling needed) or launch with configs/accelerate/ddp.yaml.")
        if fsdp2 and self.frozen_base != "fp32":
            # fully_shard all-gathers a block's parameters as one buffer of one dtype.
            raise UserError(f"precision.frozen_base {self.frozen_base} is not supported with FSDP2 "
                            f"(it shards every block's parameters in one dtype); set "
                            f"precision.frozen_base: fp32 or launch with configs/accelerate/ddp.yaml.")
        if device is not None:
            mixed_precision_for(self.mode, device)

    def accelerate_mixed_precision(self, device: torch.device) -> str:
        return mixed_precision_for(self.mode, device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.mode == "fp32" else DTYPES[self.mode]

    def apply(self, model: nn.Module) -> None:
        """Recurrence parameters, norms, adapters and trainable weights in fp32; the frozen base
        in `frozen_base`."""
        enforce_fp32(model)
        if self.frozen_base != "fp32":
            store_frozen_in(model, DTYPES[self.frozen_base])

    def evaluation_settings(self) -> dict:
        """How evaluation after training runs the forwards: weights loaded in fp32, the
        training's autocast around them (lm-eval's names)."""
        return {"dtype": "float32",
                "autocast": {"bf16": "bfloat16", "fp16": "float16"}.get(self.mode)}


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
