"""`run.compile`: torch.compile over models with mamba-ft's mixers.

Dynamo must trace a training forward in one graph: a graph break splits the step into pieces
compiled apart, with eager Python between them, and silently gives back most of what compiling
buys. The CPU tests hold the reference path to that (a transformers or torch upgrade that
brings a break back fails here); the GPU test holds the fused Triton path to it. A compiled
run must train as the eager run does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mamba_ft.errors import UserError
from mamba_ft.models import load_model
from mamba_ft.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "recipes/quickstart.yaml")


def graph_breaks(model, ids) -> tuple[int, list[str]]:
    """Dynamo's graph breaks in one training forward (logits and loss)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    explained = dynamo.explain(lambda x: model(x, labels=x).loss)(ids)
    return explained.graph_break_count, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.seam
@pytest.mark.parametrize("source", ["bundled:tiny-mamba", "bundled:tiny-mamba2"])
def test_training_forward_traces_in_one_graph_on_the_reference_path(source):
    model = load_model(source, need_tokenizer=False).model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    count, reasons = graph_breaks(model, ids)
    assert count == 0, reasons


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["bundled:tiny-mamba", "bundled:tiny-mamba2"])
def test_training_forward_traces_in_one_graph_through_the_kernels(source):
    model = load_model(source, need_tokenizer=False).model.cuda().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        count, reasons = graph_breaks(model, ids)
    assert count == 0, reasons


@pytest.mark.slow  # about 2 minutes the first time: inductor compiles C++ for the CPU
def test_compiled_run_trains_as_the_eager_run(tmp_path):
    from mamba_ft.training import loop

    common = ["run.max_steps=3", "run.save_every=0", "run.eval_batches=1",
              "logging.progress_bar=false", "logging.plot=false", "run.save_final=false"]
    eager = loop.train_from_recipe(QUICKSTART, [f"run.output_dir={tmp_path / 'eager'}", *common])
    compiled = loop.train_from_recipe(QUICKSTART, [f"run.output_dir={tmp_path / 'compiled'}",
                                                   "run.compile=true", *common])
    # fp32 on the CPU; the compiled kernels may order their sums differently.
    assert compiled.step_losses == pytest.approx(eager.step_losses, rel=1e-4)
    assert compiled.final_eval_loss == pytest.approx(eager.final_eval_loss, rel=1e-4)


@pytest.mark.parametrize("overrides,message", [
    (["run.cuda_graphs=true"], "run.compile and run.cuda_graphs together are not supported"),
    (["model.quantize=nf4"], "run.compile is not supported with model.quantize nf4"),
])
def test_compile_is_refused_where_it_is_untested(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        load_recipe(QUICKSTART, [f"run.output_dir={tmp_path}", "run.compile=true", *overrides])
