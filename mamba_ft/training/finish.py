"""What a run ends with: the result it reports, the adapter or model saved (and the merged
model), and the recipe's evaluation hooks run on the trained weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mamba_ft.recipe import Recipe


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    step_losses: list[float]
    initial_eval_loss: float | None = None
    final_eval_loss: float | None = None
    skipped_steps: int = 0
    saved_to: Path | None = None  # adapter or model directory
    metrics_path: Path | None = None
    plot_path: Path | None = None
    evaluation: dict = field(default_factory=dict)
    already_finished: bool = False  # resumed at its last step: nothing was trained or written
    cuda_graphs: bool = False  # micro-steps replayed as CUDA graphs (run.cuda_graphs, resolved)

    def summary(self) -> str:
        """What `mamba-ft train` prints at the end: what happened and where everything is."""
        if self.already_finished:
            return (f"nothing to train: the run in {self.output_dir} already finished its {self.steps} "
                    f"steps; raise run.max_steps to train on, or set run.overwrite: true to start over")
        lines = [f"\ntrained {self.steps} steps; eval loss {_fmt(self.initial_eval_loss)} -> "
                 f"{_fmt(self.final_eval_loss)}", f"  output dir: {self.output_dir}"]
        lines += [f"  {label}: {path}" for label, path in (("saved", self.saved_to), ("metrics", self.metrics_path),
                                                          ("loss curve", self.plot_path)) if path is not None]
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"



def save_final(recipe: Recipe, model, tokenizer, out: Path, state_dict: dict | None = None) -> Path:
    """The adapter (PEFT-style dir) or, for full training, the whole model with its tokenizer.

    `state_dict`: the gathered full state of an FSDP2 model (its own state_dict() holds shards).
    """
    if recipe.adapter is not None:
        from mamba_ft.adapters import merge_adapters, save_adapters

        target = out / "adapter"
        save_adapters(model, target, base_model=str(recipe.model.source))
        if recipe.run.merge_at_end:
            merge_adapters(model)
            model.save_pretrained(out / "merged")
            if tokenizer is not None:
                tokenizer.save_pretrained(out / "merged")
        return target
    target = out / "model"
    model.save_pretrained(target, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


def icl_rules_eval(cfg, model, tokenizer, out: Path) -> dict:
    from mamba_ft.evaluation.rule_accuracy import few_shot_accuracy

    accuracy = few_shot_accuracy(model, tokenizer, shots=cfg.shots, queries_per_rule=cfg.queries_per_rule,
                                 seed=cfg.seed)
    (out / "icl_rules.json").write_text(json.dumps(accuracy, indent=2))
    print("icl_rules few-shot accuracy (chance 1/6): " + ", ".join(f"{k}-shot {v:.2f}" for k, v in accuracy.items()))
    return accuracy


def icl_sweep(recipe: Recipe, model, tokenizer, out: Path) -> dict:
    from mamba_ft.evaluation.sweep import run_after_training

    source = recipe.model.source
    # A model trained from a bare config has no "before" checkpoint worth scoring.
    from_config = isinstance(source, dict) or str(source).endswith((".json", ".yaml", ".yml"))
    sweep = run_after_training(recipe.evaluation.icl_sweep, model, tokenizer,
                               None if from_config else str(source), out / "icl",
                               precision=recipe.precision_policy())
    return {"gains": sweep.gains, "ratios": sweep.ratios}


def run_evaluation_hooks(recipe: Recipe, model, tokenizer, out: Path) -> dict:
    """The recipe's `evaluation` section on the trained model: {hook name: its result}."""
    results = {}
    if recipe.evaluation.icl_rules is not None:
        results["icl_rules"] = icl_rules_eval(recipe.evaluation.icl_rules, model, tokenizer, out)
    if recipe.evaluation.icl_sweep is not None:
        results["icl_sweep"] = icl_sweep(recipe, model, tokenizer, out)
    return results
