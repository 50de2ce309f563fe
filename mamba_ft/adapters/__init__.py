"""Adapters on every buffer the fused Mamba kernels read; PEFT LoRA for Transformer baselines.

    report = attach_adapters(model, AdapterConfig(targets=["all"], rank=8))
    print(report.format())
    ... first backward ...
    check_adapter_gradients(model)
    save_adapters(model, "out/adapter", base_model="state-spaces/mamba-130m-hf")

See docs/adapters.md.
"""

from mamba_ft.adapters.attach import (
    AdapterReport,
    adapter_parameters,
    attach_adapters,
    attached,
    detach_adapters,
)
from mamba_ft.adapters.config import ALIASES, MAMBA1, MAMBA2, MAMBA_TARGETS, AdapterConfig, TargetFamily
from mamba_ft.adapters.guard import check_adapter_gradients
from mamba_ft.adapters.io import adapter_base_model, load_adapters, read_adapter_config, save_adapters
from mamba_ft.adapters.merge import merge_adapter_dir, merge_adapters

__all__ = [
    "ALIASES", "MAMBA1", "MAMBA2", "MAMBA_TARGETS", "AdapterConfig", "TargetFamily", "AdapterReport", "adapter_base_model",
    "adapter_parameters", "attach_adapters", "attached", "check_adapter_gradients",
    "detach_adapters", "load_adapters", "merge_adapter_dir", "merge_adapters",
    "read_adapter_config", "save_adapters",
]
