"""The gradient guard: an adapter that is not in the graph is an error, never a silent no-op.

After the first backward every trainable adapter parameter must hold a gradient tensor. `None`
means the forward never read the parameter (the failure plain PEFT has on Mamba's raw-weight
kernels). A gradient that is all zeros is fine: with LoRA's B = 0 initialisation, A's first
gradient is exactly zero although A is connected.
"""

from __future__ import annotations

from torch import nn

from mamba_ft.adapters.attach import adapter_parameters
from mamba_ft.errors import UserError


def check_adapter_gradients(model: nn.Module) -> None:
    """Raise UserError naming each trainable adapter parameter that received no gradient."""
    params = {n: p for n, p in adapter_parameters(model).items() if p.requires_grad}
    if not params:
        raise UserError("The gradient check found no trainable adapter parameters; attach adapters "
                        "(attach_adapters) before training with an adapter configuration.")
    dead = [n for n, p in params.items() if p.grad is None]
    if dead:
        shown = ", ".join(dead[:8]) + (f" and {len(dead) - 8} more" if len(dead) > 8 else "")
        raise UserError(f"{len(dead)} of {len(params)} adapter parameters received no gradient after "
                        f"the first backward ({shown}): the forward does not read them, so training "
                        f"would leave them unchanged. Run the model through mamba-ft's mixer "
                        f"(mamba_ft.models.load_model) or drop these targets.")
