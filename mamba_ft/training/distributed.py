"""Several processes: which launches `mamba-ft train` accepts, and FSDP2 (fully_shard) support.

DDP needs nothing here: Accelerate wraps the model and the loop (train.py) is written for it.

FSDP2 is taken over from Accelerate. `accelerate launch --config_file configs/accelerate/fsdp2.yaml`
sets the FSDP settings in the environment; `fsdp2_from_launch` reads them, and mamba-ft shards
the model itself with torch's `fully_shard`, because
- Accelerate's FSDP2 path casts *every* parameter to the autocast dtype through one
  MixedPrecisionPolicy, the SSM parameters (A_log, D, dt bias) included; mamba-ft keeps all
  parameters fp32 and computes in bf16 through the recipe's autocast, as on one device;
- Accelerate runs FSDP on GPUs only, so the same code could not be tested on CPU (gloo).
Accelerate still provides the process group, autocast, gradient accumulation, clipping (it is
DTensor-aware) and reductions; it just sees a plain multi-process launch.

Under FSDP2 a parameter outside its block's forward is a DTensor shard. The mixer reads its
weights inside its forward (`mixer_weights()`), after FSDP2's pre-forward all-gather, so the
ops see full tensors. Anything that reads parameters outside a forward (saving adapters or the
model, checkpoints, evaluation hooks on the main process) goes through `gathered()` or the
state helpers below, never through the shards.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mamba_ft.errors import UserError

FSDP2_CONFIG = "configs/accelerate/fsdp2.yaml"
DDP_CONFIG = "configs/accelerate/ddp.yaml"


@dataclass(frozen=True)
class Fsdp2Settings:
    """What the FSDP2 launch asked for, as far as mamba-ft uses it."""

    reshard_after_forward: bool = True
    layer_classes: tuple[str, ...] | None = None  # None: the model's _no_split_modules


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def fsdp2_from_launch() -> Fsdp2Settings | None:
    """The FSDP2 settings of this `accelerate launch`, None for any other launch.

    Refuses, with one message each, what mamba-ft cannot run correctly: DeepSpeed, FSDP1, and
    FSDP2 options it does not implement. Read before anything is loaded.
    """
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise UserError(f"DeepSpeed launches are not supported (ZeRO would shard and cast mamba-ft's "
                        f"fp32 SSM and adapter parameters outside its control); launch with "
                        f"{FSDP2_CONFIG} or {DDP_CONFIG} instead.")
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise UserError(f"FSDP version {version} is not supported: FSDP1 flattens each unit into one "
                        f"tensor, which cannot mix frozen base weights with trainable adapters or fp32 "
                        f"SSM parameters with other dtypes; set fsdp_version: 2 (launch with "
                        f"{FSDP2_CONFIG}).")
    for name, what in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                       ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing"),
                       ("FSDP_CPU_RAM_EFFICIENT_LOADING", "fsdp_cpu_ram_efficient_loading")):
        if _flag(name):
            raise UserError(f"{what}: true is not supported by mamba-ft's FSDP2 path yet; set it to "
                            f"false (as in {FSDP2_CONFIG}).")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    if policy not in ("TRANSFORMER_BASED_WRAP", ""):
        raise UserError(f"fsdp_auto_wrap_policy {policy} is not supported; use TRANSFORMER_BASED_WRAP "
                        f"(one FSDP unit per Mamba block or decoder layer), as in {FSDP2_CONFIG}.")
    classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
    return Fsdp2Settings(
        reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        layer_classes=tuple(c.strip() for c in classes.split(",") if c.strip()) or None,
    )


@contextmanager
def plain_multiprocess_accelerate():
    """Build the Accelerator inside this: it sees a plain multi-process launch (no FSDP)."""
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["ACCELERATE_USE_FSDP"]
        else:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def check_fsdp2_recipe(recipe) -> None:
    """Refuse the recipe settings the FSDP2 path does not run correctly (the precision ones
    are the precision policy's to check, with fsdp2=True)."""
    if recipe.run.merge_at_end:
        raise UserError("run.merge_at_end is not supported with FSDP2; train with it off and merge the "
                        "saved adapter afterwards: mamba-ft merge OUTPUT_DIR/adapter --out MERGED_DIR.")
    recipe.precision_policy().check(adapter=recipe.adapter is not None, merge_at_end=False,
                                    cuda_graphs=recipe.run.cuda_graphs_forced, fsdp2=True)
    if recipe.model.quantize.enabled:
        # FSDP2 shards a block's parameters as one flat dtype; bitsandbytes' packed weights and
        # their quantisation states are not shardable that way.
        raise UserError(f"model.quantize {recipe.model.quantize.kind} is not supported with FSDP2; "
                        f"launch with configs/accelerate/ddp.yaml or one process.")


def _layer_class_names(model: nn.Module, settings: Fsdp2Settings) -> tuple[str, ...]:
    if settings.layer_classes:
        return settings.layer_classes
    for module in model.modules():  # a PEFT wrapper holds the transformers model inside
        names = getattr(module, "_no_split_modules", None)
        if names:
            return tuple(names)
    raise UserError("FSDP2 needs the model's layer class to shard; this model names none "
                    "(_no_split_modules); set fsdp_transformer_layer_cls_to_wrap in the launch config.")


def shard_model(model: nn.Module, settings: Fsdp2Settings, device: torch.device) -> nn.Module:
    """fully_shard every block (MambaBlock / decoder layer), then the root; parameters stay fp32.

    The root unit holds the embeddings, the final norm and the (tied) head with their adapters.
    No MixedPrecisionPolicy cast: parameters are all-gathered in their own dtype (fp32) and the
    forward computes in the recipe's autocast dtype; gradients are reduced in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    wanted = _layer_class_names(model, settings)
    model.to(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    blocks = []
    for module in model.modules():
        # Outermost matches only (transformers lists MambaMixer too, which sits in MambaBlock).
        if type(module).__name__ in wanted and not any(_contains(b, module) for b in blocks):
            blocks.append(module)
    if not blocks:
        raise UserError(f"FSDP2 found no layer of class {', '.join(wanted)} in this model; set "
                        f"fsdp_transformer_layer_cls_to_wrap in the launch config to its layer class.")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _contains(parent: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in parent.modules())


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: nn.Module):
    """Inside, every parameter of a sharded model is the full tensor, on every process.

    Run by all processes together (all-gathers). The main process may then save the adapters
    or the model with the single-device code, and run forwards alone: no block reshards after
    its forward while inside. A model that is not sharded passes through unchanged.
    """
    if not is_sharded(model):
        yield model
        return
    units = _fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def full_state_dict(model: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """The whole model's full state (CPU) on the main process, {} elsewhere; all processes call it.

    For save_pretrained(state_dict=...): a sharded model's own state_dict() returns shards
    (DTensors), even while gathered.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Gathered copies no longer share storage, so save_pretrained could not see that the head is
    # tied to the embeddings: keep each tensor once, under the name named_parameters() uses.
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {n: t for n, t in full.items() if n in keep} if is_main else {}


def full_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each trainable parameter's full shape (DTensor shards report the global shape)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def check_saved_shapes(found: list[tuple[int, ...]], expected: list[tuple[int, ...]], where: str) -> None:
    """The saved tensors have exactly the expected full shapes, none empty.

    The trap this guards against: saving from sharded parameters writes shards (or nothing).
    """
    if sorted(found) != sorted(expected) or any(math.prod(s) == 0 for s in found):
        wrong = sorted(set(found) ^ set(expected)) or [s for s in found if math.prod(s) == 0]
        raise RuntimeError(f"{where} holds {len(found)} tensors where {len(expected)} full ones were "
                           f"expected (first mismatching shape: {wrong[0] if wrong else '?'}); the save "
                           f"did not gather the sharded parameters.")


def check_saved(saved_to, full_shapes: dict[str, tuple[int, ...]], adapter: bool) -> None:
    """What the main process saved from a sharded model holds every trainable tensor whole."""
    from pathlib import Path

    from safetensors.torch import load_file

    saved_to = Path(saved_to)
    if adapter:
        from mamba_ft.adapters.attach import is_adapter_parameter
        from mamba_ft.adapters.io import read_adapter_dir

        # The files use PEFT's names, not the parameters': compare the shapes as multisets.
        found = [tuple(t.shape) for t in read_adapter_dir(saved_to)[2].values()]
        check_saved_shapes(found, [s for n, s in full_shapes.items() if is_adapter_parameter(n)], str(saved_to))
        return
    tensors = {}
    for file in sorted(saved_to.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    # named_parameters() lists a tied weight once, under the name save_pretrained keeps.
    check_saved_shapes([tuple(tensors[n].shape) if n in tensors else () for n in full_shapes],
                       list(full_shapes.values()), str(saved_to))


# --- checkpoint state (the same files as on one device) ------------------------------------

def trainable_state(model: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """Full trainable tensors (CPU) on the main process, {} elsewhere; all processes call it."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        full = param.full_tensor() if isinstance(param, DTensor) else param  # collective for shards
        if is_main:
            state[name] = full.detach().cpu().contiguous()
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into (possibly sharded) parameters; every process passes the full state."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            param = params[name]
            if isinstance(param, DTensor):
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh,
                                          param.placements)
                param.to_local().copy_(value.to_local())
            else:
                param.copy_(value)


def optimizer_state(model: nn.Module, optimizer, is_main: bool) -> dict:
    """The optimizer state to save. Sharded: gathered, keyed by parameter name (main only)."""
    if not is_sharded(model):
        return optimizer.state_dict() if is_main else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, _inner(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if is_main else {}


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def layout(model: nn.Module) -> str:
    """How a checkpoint's optimizer state is keyed: 'fsdp2' (by name) or 'replicated' (by index)."""
    return "fsdp2" if is_sharded(model) else "replicated"


def run_launcher(cmd: list[str], env: dict, timeout: float, cwd=None) -> tuple[int, str, str, bool]:
    """Run a multi-process launcher (torchrun, accelerate launch) to completion or `timeout`.

    Returns (exit code, stdout, stderr, timed out). On timeout the launcher is stopped with its
    workers, so a hung collective cannot leave processes on the GPUs: each launch gets its own
    session; SIGTERM to the launcher makes it stop its workers (SIGKILL would orphan them), and
    SIGKILL follows only if that fails. Output goes to files, not pipes, which an orphan could
    hold open.
    """
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), timed_out
