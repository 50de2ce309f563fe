"""What a run does once its steps are done: save the adapter or model (and the merged model),
and run the recipe's evaluation hooks on the trained weights."""

from __future__ import annotations

import json
from pathlib import Path

from mamba_ft.recipe import Recipe


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
