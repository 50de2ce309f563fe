"""Checkpoints: written atomically during a run, read back to resume it exactly.

A checkpoint holds the trainable tensors (safetensors), the optimizer moments and loss scale,
every process's RNG states and `trainer_state.json` (step, losses, launch layout, the schedule
it trained with). Nothing in it needs pickled code to load (weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mamba_ft.errors import UserError
from mamba_ft.training import distributed


def save_checkpoint(out, step, step_losses, skipped, model, optimizer, schedule, accelerator):
    """Write checkpoints/step-N atomically (temporary dir, then rename); run_dir prunes them.

    `schedule` (schedule.describe) is recorded so a resumed run can say what it changed; the
    scheduler itself is rebuilt from the recipe on resume, so its state is not saved.
    """
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    # Every process takes part in gathering (FSDP2 shards); the main one writes.
    unwrapped, main = accelerator.unwrap_model(model), accelerator.is_main_process
    trainable = distributed.trainable_state(unwrapped, main)
    optimizer_state = distributed.optimizer_state(unwrapped, optimizer, main)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of our own interrupted save
        tmp.mkdir(parents=True)
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state,
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None},
                   tmp / "optimizer.pt")
    accelerator.wait_for_everyone()
    # Every process saves its own RNG states (dropout, anything random in the forward).
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain tensors and tuples only, so loading needs no pickled code (weights_only=True).
    torch.save({"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "step_losses": step_losses, "skipped_steps": skipped,
             "num_processes": accelerator.num_processes, "layout": distributed.layout(unwrapped),
             "schedule": schedule}))
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, model, optimizer, accelerator) -> dict:
    """Restore weights, optimizer moments, loss scale and RNG; the checkpoint's trainer_state.

    The scheduler state an older checkpoint holds is not used: the schedule comes from the
    recipe (mamba_ft/training/schedule.py).
    """
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    if state["num_processes"] != accelerator.num_processes:
        raise UserError(f"Checkpoint {path} was written by {state['num_processes']} processes and this "
                        f"run has {accelerator.num_processes}; resume with the same number of processes.")
    unwrapped = accelerator.unwrap_model(model)
    written_by, this_run = state.get("layout", "replicated"), distributed.layout(unwrapped)
    if written_by != this_run:
        raise UserError(f"Checkpoint {path} was written by a {written_by} launch and this run is "
                        f"{this_run} (FSDP2 vs DDP / one device); resume with the launch config that wrote it.")
    distributed.load_trainable_state(unwrapped, load_file(str(path / "trainable.safetensors")))
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    distributed.load_optimizer_state(unwrapped, optimizer, saved["optimizer"])
    if accelerator.scaler and saved["scaler"]:
        accelerator.scaler.load_state_dict(saved["scaler"])
    rng = torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True)
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
