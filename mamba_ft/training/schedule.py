"""The learning-rate schedule, built from the recipe by transformers' `get_scheduler`.

On resume the schedule is rebuilt from the recipe (optim.lr, schedule.*, the run's length)
and placed at the checkpoint's position, so a changed lr or an extended run.max_steps applies
from the resume step on; the optimizer's moments come from the checkpoint, its
hyperparameters (lr, betas, eps, weight_decay) from the recipe. `describe` is what the run
records in each checkpoint and `resume_line` compares against it.
"""

from __future__ import annotations

import warnings


def build(optimizer, recipe, total_steps: int, position: int):
    """The recipe's schedule over `total_steps`, at `position` (optimizer steps applied so far).

    The lr the next step uses is `scheduler.get_last_lr()`, that of a fresh schedule stepped
    `position` times.
    """
    from transformers import get_scheduler

    set_hyperparameters(optimizer, recipe.optim)
    sched, ratio = recipe.schedule, recipe.schedule.min_lr_ratio
    name, extra = {
        "constant": ("constant_with_warmup", None),
        "linear": ("linear", None) if ratio == 0 else ("polynomial", {"lr_end": recipe.optim.lr * ratio, "power": 1.0}),
        "cosine": ("cosine", None) if ratio == 0 else ("cosine_with_min_lr", {"min_lr_rate": ratio}),
    }[sched.kind]
    if ratio == 1.0:  # a floor equal to the peak: transformers' polynomial refuses it, and it is constant
        name, extra = "constant_with_warmup", None
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=sched.warmup_steps,
                              num_training_steps=total_steps, scheduler_specific_kwargs=extra)
    if position:
        # One step from position - 1 computes the lr at `position` from the schedule's own
        # formula, as stepping a fresh schedule `position` times would. torch warns of a
        # scheduler stepped before its optimizer, which is what fast-forwarding is.
        scheduler.last_epoch = position - 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            scheduler.step()
    return scheduler


def set_hyperparameters(optimizer, optim) -> None:
    """The recipe's AdamW settings on every group (loading a checkpoint restores the old ones)."""
    for group in optimizer.param_groups:
        group.update(lr=optim.lr, initial_lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                     weight_decay=optim.weight_decay)


def describe(recipe, total_steps: int) -> dict:
    return {"lr": recipe.optim.lr, "kind": recipe.schedule.kind, "warmup_steps": recipe.schedule.warmup_steps,
            "min_lr_ratio": recipe.schedule.min_lr_ratio, "total_steps": total_steps}


def resume_line(checkpoint, step: int, recorded: dict | None, now: dict) -> str:
    """One line: what a resumed run took from the checkpoint and what from the recipe."""
    line = (f"resumed from {checkpoint} at step {step}: weights, optimizer moments, data position and "
            f"RNG from the checkpoint; lr schedule ({now['kind']}, lr {now['lr']:g}, warmup "
            f"{now['warmup_steps']}, {now['total_steps']} steps) from the recipe")
    if recorded is None:
        return line + " (the checkpoint does not record the schedule it was trained with)"
    changed = [f"{key} {recorded[key]:g} -> {now[key]:g}" if isinstance(now[key], (int, float))
               else f"{key} {recorded[key]} -> {now[key]}"
               for key in now if recorded.get(key) != now[key]]
    return line + (f", changed from the checkpoint's run: {', '.join(changed)}" if changed else ", unchanged")
