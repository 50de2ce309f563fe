"""Whether a run replays its micro-steps as CUDA graphs: `run.cuda_graphs` (auto, true, false)
decided from the recipe and the launch, with the reason in one line.

`true` and `false` are the user's word; what `true` cannot run is refused elsewhere (the
recipe's validators, `setup.check_cuda_graphs`, `setup.check_chunked_head_loss`). `auto`, the
default, turns graphs on only where all of these hold, and says which one failed otherwise:
- the launch: one process on a CUDA GPU, the model not sharded (a graph replays one device's
  kernels; a multi-process launch resolves to off, never to an error);
- nothing `true` would refuse: precision.mode fp16, run.compile, model.quantize,
  run.chunked_head_loss;
- a capture known to work: a model type whose graphed training is tested
  (`graphs_by_default` in models/model_types.py), and no model.checkpoint_blocks
  (transformers' checkpointing saves and restores the RNG state inside the step, untested
  under capture);
- fixed shapes that cost nothing: packed rows built from the recipe's data. A graph replays
  micro-batches padded to data.max_length; packed rows already fill it, while unpacked rows
  would be padded beyond the longest row of each batch (eager's length), which can cost more
  than the graph saves. Data passed to `train()` ready-tokenized is not bounded by
  data.max_length at all (the synthetic runner sets it to 1,000,000).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mamba_ft.models.model_types import MODEL_TYPES, mamba_model_type
from mamba_ft.recipe import Recipe


@dataclass(frozen=True)
class GraphDecision:
    requested: bool | str  # the recipe's value: "auto", True or False
    on: bool
    reason: str

    def line(self) -> str:
        """What the run prints and records, e.g. `run.cuda_graphs: auto -> off: run.compile is set`."""
        asked = self.requested if isinstance(self.requested, str) else str(self.requested).lower()
        return (f"run.cuda_graphs: {asked} -> on ({self.reason})" if self.on
                else f"run.cuda_graphs: {asked} -> off: {self.reason}")


def decide_cuda_graphs(recipe: Recipe, *, device: torch.device, num_processes: int, sharded: bool,
                       model_type: str | None, has_mixers: bool, data_passed_in: bool) -> GraphDecision:
    """`run.cuda_graphs` resolved for this run. `model_type`: the model's config.model_type;
    `has_mixers`: whether mamba-ft's mixers are swapped in; `data_passed_in`: whether the
    training data was handed to `train()` instead of built from the recipe."""
    asked = recipe.run.cuda_graphs
    if asked != "auto":
        return GraphDecision(asked, asked, "set in the recipe")
    entry = mamba_model_type(model_type) if has_mixers else None
    run, model = recipe.run, recipe.model
    blockers = (
        (device.type != "cuda", f"no CUDA GPU (this run is on the {device.type})"),
        (num_processes > 1, f"{num_processes} processes (a graph replays one GPU's step)"),
        (sharded, "FSDP2 shards the model"),
        (recipe.precision.mode == "fp16",
         "precision.mode fp16 (its loss scaler decides on the host whether to skip a step)"),
        (run.compile, "run.compile is set"),
        (model.quantize.enabled, f"model.quantize {model.quantize.kind} is set"),
        (run.chunked_head_loss, "run.chunked_head_loss is set"),
        (model.checkpoint_blocks, "model.checkpoint_blocks is set (untested inside a graph)"),
        (entry is None or not entry.graphs_by_default, _untested_model(model_type, has_mixers)),
        (data_passed_in, "the training data was passed in tokenized, so data.max_length does "
                         "not bound its rows"),
        (not recipe.data.packing, "data.packing is false, so every micro-batch would be padded to "
                                  "data.max_length; set run.cuda_graphs: true if rows are about "
                                  "that long"),
    )
    reason = next((why for blocked, why in blockers if blocked), None)
    if reason is not None:
        return GraphDecision("auto", False, reason)
    return GraphDecision("auto", True, f"one CUDA process, a {entry.name} model, packed rows of "
                                       f"data.max_length tokens")


def _untested_model(model_type: str | None, has_mixers: bool) -> str:
    graphed = ", ".join(t for t, entry in MODEL_TYPES.items() if entry.graphs_by_default)
    what = f"a {model_type!r} model" if has_mixers else f"a Transformer ({model_type!r})"
    return f"{what}: graphs are on by default only for {graphed}; set run.cuda_graphs: true to try"
