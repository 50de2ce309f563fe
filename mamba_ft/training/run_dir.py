"""A run's output directory: what may be written where, checkpoints kept, checkpoints trusted.

- `check_output_dir` only looks (every process may call it before anything is loaded);
  `claim_output_dir` writes, and is called once the recipe, the model and the data have been
  checked, so a failed start leaves nothing that blocks the corrected command.
- `run.overwrite` replaces a previous mamba-ft run's own files (`RUN_OUTPUTS`), never a
  directory that holds anything else.
- A checkpoint is trusted once the step after it was finite: pruning to `run.keep_last` counts
  only those, and a non-finite step sets aside the checkpoint it started from, whose weights
  produced it (`nonfinite_stop`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from mamba_ft.errors import UserError
from mamba_ft.recipe import Recipe

# Sections whose change makes an output_dir hold "a different run". On resume, optim and
# schedule come from the recipe (docs/recipes.md, "Resuming"), so they may change there.
_RUN_IDENTITY = ("model", "adapter", "precision", "data", "optim", "schedule")
_FROM_RECIPE_ON_RESUME = ("optim", "schedule")
_RUN_IDENTITY_KEYS = ("micro_batch_size", "grad_accum_steps", "seed")
# What a run writes into output_dir (besides its tracker directory): all run.overwrite may replace.
RUN_OUTPUTS = ("recipe.yaml", "metrics.jsonl", "loss.png", "checkpoints", "adapter", "model", "merged",
               "icl_rules.json", "icl")
_SET_ASIDE = "nonfinite-"


def run_identity(recipe: Recipe, resuming: bool) -> dict:
    dumped = recipe.model_dump(mode="json")
    identity = {key: dumped[key] for key in _RUN_IDENTITY
                if not (resuming and key in _FROM_RECIPE_ON_RESUME)}
    identity["run"] = {key: dumped["run"][key] for key in _RUN_IDENTITY_KEYS}
    return identity


def check_output_dir(recipe: Recipe, out: Path) -> Path | None:
    """Refuse an output_dir this run may not use; the checkpoint to resume from. Writes nothing."""
    run = recipe.run
    resume_from = _resume_target(run, out)
    if not (out.exists() and any(out.iterdir())):
        return resume_from
    saved = out / "recipe.yaml"
    if not saved.is_file():
        raise UserError(f"output_dir {out} is not empty and holds no mamba-ft run; choose another "
                        f"run.output_dir (mamba-ft never writes into a directory of other files, "
                        f"run.overwrite included).")
    if run.overwrite and resume_from is None:
        foreign = _foreign_entries(out, saved)
        if foreign:
            raise UserError(f"run.overwrite replaces only a previous mamba-ft run's own files, and "
                            f"output_dir {out} also holds {', '.join(foreign)}; move those away or "
                            f"choose another run.output_dir.")
        return None
    if resume_from is not None and not _same_run(saved, recipe, resuming=True):
        raise UserError(f"output_dir {out} holds a run that differs from this recipe in more than optim "
                        f"and schedule; a resumed run keeps its model, adapter, precision, data, batch "
                        f"split and seed (docs/recipes.md, Resuming). Choose another run.output_dir.")
    if resume_from is None and not _same_run(saved, recipe, resuming=False):
        raise UserError(f"output_dir {out} already holds a different run (its recipe.yaml differs); "
                        f"choose another run.output_dir, or set run.overwrite: true to replace it.")
    if resume_from is None and run.resume == "auto":
        raise UserError(f"output_dir {out} holds this run but no checkpoint to resume from; set "
                        f"run.overwrite: true to start it again, or choose another run.output_dir.")
    if resume_from is None:
        raise UserError(f"output_dir {out} already holds this run; set run.resume: auto to continue "
                        f"it, or run.overwrite: true to start it again.")
    return resume_from


def claim_output_dir(recipe: Recipe, out: Path, resume_from: Path | None, accelerator,
                     resolved: tuple[str, ...] = ()) -> None:
    """Write the resolved recipe; with run.overwrite, first remove the previous run's files.

    `resolved`: what this launch made of the recipe's `auto` values (e.g. `run.cuda_graphs:
    auto -> on (...)`), written as comments above it, so the recipe itself keeps the user's
    values and reads back unchanged."""
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        saved = out / "recipe.yaml"
        if recipe.run.overwrite and resume_from is None and saved.is_file():
            print(f"run.overwrite: replacing the previous run in {out}")
            for name in _own_entries(saved):
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text("".join(f"# {line}\n" for line in resolved) + recipe.to_yaml())
    accelerator.wait_for_everyone()


def _resume_target(run, out: Path) -> Path | None:
    if run.resume == "auto":
        return latest_checkpoint(out)
    if run.resume is None:
        return None
    resume_from = Path(run.resume)
    if not (resume_from / "trainer_state.json").is_file():
        raise UserError(f"run.resume points to {resume_from}, which is not a mamba-ft checkpoint "
                        f"(no trainer_state.json); use 'auto' or a checkpoints/step-N directory.")
    return resume_from


def _same_run(saved: Path, recipe: Recipe, resuming: bool) -> bool:
    try:
        previous = Recipe.model_validate(yaml.safe_load(saved.read_text()))
    except Exception:  # an older or hand-edited recipe.yaml: not provably the same run
        return False
    return run_identity(previous, resuming) == run_identity(recipe, resuming)


def _own_entries(saved: Path) -> set[str]:
    """Names a run recorded by `saved` writes into its output_dir, its tracker directory included."""
    try:
        previous = yaml.safe_load(saved.read_text()) or {}
        tracker = (previous.get("logging") or {}).get("wandb_project") or "mamba-ft"
    except (yaml.YAMLError, AttributeError):
        tracker = "mamba-ft"
    return {*RUN_OUTPUTS, str(tracker)}


def _foreign_entries(out: Path, saved: Path) -> list[str]:
    own = _own_entries(saved)
    return sorted(p.name for p in out.iterdir() if p.name not in own)


# --- checkpoints ---------------------------------------------------------------------------------

def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (checkpoints/step-N with trainer_state.json), oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()), key=_step_of)


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: Path, keep_last: int, trusted_through: int) -> None:
    """Keep the newest `keep_last` trusted checkpoints (step <= trusted_through) and any newer one.

    A checkpoint is trusted once the step after it was finite; keeping the one before an
    untrusted newest means a non-finite next step still leaves good weights, whatever keep_last.
    """
    trusted = [p for p in checkpoints(out) if _step_of(p) <= trusted_through]
    for stale in trusted[:-keep_last]:
        shutil.rmtree(stale)


def nonfinite_stop(out: Path, step: int, what: str, value: float, accelerator) -> UserError:
    """The error for a non-finite loss or gradient norm at `step` (1-based).

    Step `step` started from the weights after step - 1: a checkpoint of them (or later) is
    moved to checkpoints/nonfinite-step-N, out of `run.resume: auto`'s reach, and the newest
    checkpoint left is named as the good one.
    """
    set_aside = [p for p in checkpoints(out) if _step_of(p) >= step - 1]
    if accelerator.is_main_process:
        for path in set_aside:
            path.rename(path.with_name(_SET_ASIDE + path.name))
    accelerator.wait_for_everyone()
    good = [p for p in checkpoints(out) if _step_of(p) < step - 1]
    moved = (f" {', '.join(p.name for p in set_aside)} held weights that led to it and "
             f"{'was' if len(set_aside) == 1 else 'were'} moved to checkpoints/{_SET_ASIDE}*.") if set_aside else ""
    if good:
        where = (f"The last good checkpoint (every step before it and the one after it finite) is "
                 f"{good[-1]}; continue from it with run.resume=auto and a lower optim.lr.")
    else:
        where = ("No checkpoint made of finite steps only remains; start again (run.overwrite=true) "
                 "with a lower optim.lr.")
    return UserError(f"The training {what} became {value} at step {step}; stopped.{moved} {where} "
                     f"Also consider precision.mode: bf16 or fp32, or check the data.")


def interrupted_message(out: Path, step: int, total_steps: int) -> str:
    """What an interrupted run says: where it got to and how to go on from there."""
    newest = latest_checkpoint(out)
    where = (f"the newest checkpoint is {newest}; run the same command with run.resume=auto to "
             f"continue from it" if newest is not None else
             "no checkpoint was saved yet (run.save_every sets how often)")
    return f"interrupted at step {step} of {total_steps}: {where}."
