"""run.cuda_graphs: the graphed micro-step (mamba_ft.training.cuda_graph) trains exactly like the eager one.

On the CPU: the recipe and launch checks, what `auto` decides for each condition
(mamba_ft.training.graph_decision), a default run on the CPU, and fixed-length batches. On a
GPU (`-m gpu`): a tiny Mamba trained with the micro-step replayed as a CUDA graph against the
same model trained eagerly, through the training loop and through `GraphedMicroStep`
directly; every model type `auto` graphs, graphed by default against eager; a graphed run
resumed from a checkpoint; the Transformer baseline graphed against eager.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import mamba_ft.training.loop as train_mod
import mamba_ft.training.setup as setup_mod
import mamba_ft.training.step as step_mod
from mamba_ft.training import run_dir
from mamba_ft import data as data_lib
from mamba_ft.errors import UserError
from mamba_ft.models.model_types import MODEL_TYPES
from mamba_ft.recipe import load_recipe, validate_recipe
from mamba_ft.training.graph_decision import decide_cuda_graphs

REPO = Path(__file__).resolve().parents[2]
TINY_MAMBA = {"model_type": "mamba", "vocab_size": 272, "hidden_size": 32, "state_size": 8,
              "num_hidden_layers": 2, "expand": 2, "conv_kernel": 4}
# A tiny model of every pure Mamba type: those `run.cuda_graphs: auto` graphs
# (graphs_by_default in model_types.py), and those that may join them once their graphed
# training matches eager on a GPU.
TINY_GRAPHED = {
    "mamba": TINY_MAMBA,
    "falcon_mamba": {**TINY_MAMBA, "model_type": "falcon_mamba"},
    "mamba2": {"model_type": "mamba2", "vocab_size": 272, "hidden_size": 32, "num_heads": 8,
               "head_dim": 8, "n_groups": 2, "state_size": 8, "chunk_size": 16, "expand": 2,
               "conv_kernel": 4, "num_hidden_layers": 2},
}
GRAPHED_BY_DEFAULT = [t for t, entry in MODEL_TYPES.items() if entry.graphs_by_default]


def recipe_dict(out, *, cuda_graphs, mode="bf16", adapter=None, packing=False):
    return {
        "model": {"source": dict(TINY_MAMBA), "tokenizer": "bundled:tokenizer", "init_seed": 0},
        "adapter": adapter,
        "precision": {"mode": mode},
        "data": {"train": {"icl_rules": {"n_documents": 48, "seed": 0, "min_demos": 1, "max_demos": 3}},
                 "eval": {"icl_rules": {"n_documents": 8, "seed": 1, "min_demos": 1, "max_demos": 3}},
                 "max_length": 64, "packing": packing},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "run": {"output_dir": str(out), "max_steps": 6, "micro_batch_size": 2, "grad_accum_steps": 2,
                "cuda_graphs": cuda_graphs},
        "logging": {"progress_bar": False, "plot": False},
    }


def test_fp16_is_refused_with_the_fix(tmp_path):
    with pytest.raises(UserError, match="run.cuda_graphs does not run with precision.mode fp16.*bf16"):
        validate_recipe(recipe_dict(tmp_path, cuda_graphs=True, mode="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cpu_run_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="run.cuda_graphs needs a CUDA GPU.*run.cuda_graphs: false"):
        train_mod.train(validate_recipe(recipe_dict(out, cuda_graphs=True, mode="fp32")))
    assert not out.exists()


def test_multi_process_launch_is_refused(tmp_path):
    from types import SimpleNamespace

    recipe = validate_recipe(recipe_dict(tmp_path, cuda_graphs=True))
    two_gpus = SimpleNamespace(device=torch.device("cuda", 0), num_processes=2)
    with pytest.raises(UserError, match="runs on one GPU and this launch has 2 processes"):
        setup_mod.check_cuda_graphs(recipe, two_gpus)
    setup_mod.check_cuda_graphs(recipe, SimpleNamespace(device=torch.device("cuda", 0), num_processes=1))


def test_recipe_takes_auto_true_false_and_refuses_anything_else(tmp_path):
    recipe = REPO / "recipes" / "quickstart.yaml"
    out = f"run.output_dir={tmp_path}"
    assert load_recipe(recipe, [out]).run.cuda_graphs == "auto"  # the default
    for value, read in (("auto", "auto"), ("true", True), ("false", False)):
        loaded = load_recipe(recipe, [out, f"run.cuda_graphs={value}"])
        assert loaded.run.cuda_graphs == read
        assert f"cuda_graphs: {value}\n" in loaded.to_yaml()  # what `mamba-ft validate` prints
    for junk in ("maybe", "1"):
        with pytest.raises(UserError, match=r"'run.cuda_graphs' in .*: must be auto, true or false "
                                            rf"\(got '?{junk}'?\)"):
            load_recipe(recipe, [out, f"run.cuda_graphs={junk}"])
    # `auto` is no request for graphs: what `true` refuses stays valid with it.
    load_recipe(recipe, [out, "run.compile=true"])
    load_recipe(recipe, [out, "model.quantize=nf4"])
    load_recipe(recipe, [out, "precision.mode=fp16"])


def _decide(recipe, *, device="cuda", num_processes=1, sharded=False, model_type="mamba",
            has_mixers=True, data_passed_in=False):
    return decide_cuda_graphs(recipe, device=torch.device(device), num_processes=num_processes,
                              sharded=sharded, model_type=model_type, has_mixers=has_mixers,
                              data_passed_in=data_passed_in)


def _graphable(tmp_path, **changes):
    """A recipe `auto` graphs on one GPU: packed bf16 rows, LoRA, nothing graphs cannot take."""
    d = recipe_dict(tmp_path, cuda_graphs="auto", adapter={"targets": ["all"], "rank": 4}, packing=True)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        d[section][key] = value
    return d


@pytest.mark.parametrize("model_type", GRAPHED_BY_DEFAULT)
def test_auto_is_on_for_one_cuda_process_of_a_graphed_type(tmp_path, model_type):
    decision = _decide(validate_recipe(_graphable(tmp_path)), model_type=model_type)
    assert decision.on
    assert decision.line() == (f"run.cuda_graphs: auto -> on (one CUDA process, a "
                               f"{MODEL_TYPES[model_type].name} model, packed rows of data.max_length tokens)")


@pytest.mark.parametrize("recipe_changes,launch,reason,refused_with_true", [
    ({}, {"device": "cpu"}, "no CUDA GPU (this run is on the cpu)", "needs a CUDA GPU"),
    ({}, {"num_processes": 2}, "2 processes", "runs on one GPU"),
    ({}, {"sharded": True}, "FSDP2 shards the model", None),
    ({"precision__mode": "fp16"}, {}, "precision.mode fp16", "does not run with precision.mode fp16"),
    ({"run__compile": True}, {}, "run.compile is set", "run.compile and run.cuda_graphs"),
    ({"model__quantize": "nf4"}, {}, "model.quantize nf4 is set", "not supported with model.quantize"),
    ({"run__chunked_head_loss": True}, {}, "run.chunked_head_loss is set", "does not run with run.cuda_graphs"),
    ({"model__checkpoint_blocks": True}, {}, "model.checkpoint_blocks is set", None),
    ({}, {"model_type": "gpt_neox", "has_mixers": False}, "a Transformer ('gpt_neox')", None),
    ({}, {"model_type": "jamba"}, "a 'jamba' model: graphs are on by default only for mamba", None),
    ({}, {"data_passed_in": True}, "training data was passed in tokenized", None),
    ({"data__packing": False}, {}, "data.packing is false", None),
], ids=["cpu", "two-processes", "fsdp2", "fp16", "compile", "quantize", "chunked-head", "checkpoint-blocks",
        "transformer", "hybrid", "data-passed-in", "unpacked"])
def test_auto_is_off_with_the_reason(tmp_path, recipe_changes, launch, reason, refused_with_true):
    """Each condition alone turns `auto` off, and the line says which. Where `true` is refused,
    the same setting is checked to be refused: auto never turns on what true cannot run."""
    decision = _decide(validate_recipe(_graphable(tmp_path, **recipe_changes)), **launch)
    assert not decision.on
    assert decision.line().startswith("run.cuda_graphs: auto -> off: ") and reason in decision.line()
    if refused_with_true is not None:
        from types import SimpleNamespace

        launched = {"device": "cuda", "num_processes": 1, **launch}
        accelerator = SimpleNamespace(device=torch.device(launched["device"]),
                                      num_processes=launched["num_processes"])
        with pytest.raises(UserError, match=refused_with_true):
            forced = validate_recipe(_graphable(tmp_path, **recipe_changes, run__cuda_graphs=True))
            setup_mod.check_cuda_graphs(forced, accelerator)
            setup_mod.check_chunked_head_loss(forced, accelerator, None)


def test_true_and_false_are_taken_as_given(tmp_path):
    """The refusals of `true` are the recipe's and setup's; the decision only reports it."""
    forced = _decide(validate_recipe(_graphable(tmp_path, run__cuda_graphs=True)), model_type="gpt_neox",
                     has_mixers=False)
    assert forced.on and forced.line() == "run.cuda_graphs: true -> on (set in the recipe)"
    off = _decide(validate_recipe(_graphable(tmp_path, run__cuda_graphs=False)))
    assert not off.on and off.line() == "run.cuda_graphs: false -> off: set in the recipe"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default's decision on a machine without a GPU")
def test_default_run_on_the_cpu_says_graphs_are_off_and_trains(tmp_path, capsys):
    d = recipe_dict(tmp_path / "run", cuda_graphs=None, mode="fp32", packing=True)
    del d["run"]["cuda_graphs"]
    result = train_mod.train(validate_recipe(d))
    line = "run.cuda_graphs: auto -> off: no CUDA GPU (this run is on the cpu)"
    assert capsys.readouterr().out.count(line) == 1
    assert not result.cuda_graphs
    assert result.steps == 6 and result.final_eval_loss < result.initial_eval_loss
    # The saved recipe keeps the user's `auto`; what this launch made of it is a comment above.
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert saved.startswith(f"# {line}\n")
    assert validate_recipe(__import__("yaml").safe_load(saved)).run.cuda_graphs == "auto"


def test_fixed_length_batches_pad_and_refuse_longer_rows():
    columns = {"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [8]]}
    batch = data_lib.collate(columns, pad_id=0, length=6)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [8, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1]
    assert (batch["labels"][:, 3:] == data_lib.IGNORE).all()
    with pytest.raises(UserError, match="more than the fixed batch length 2"):
        data_lib.collate(columns, pad_id=0, length=2)


# --- on a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("adapter,packing", [(None, True), ({"targets": ["all"], "rank": 4}, False)],
                         ids=["full-packed", "lora-padded"])
def test_training_loop_with_graphs_matches_eager(tmp_path, adapter, packing):
    """The same recipe with and without run.cuda_graphs: the same losses, step by step.

    Both runs execute the same kernels on the same values (the graphed run's batches carry
    extra masked padding, which changes no real position). What may differ is the order of
    the scan backward's fp32 atomic adds (dB, dC), so losses agree to rtol 1e-3 under bf16
    after 6 optimizer steps, not bitwise.
    """
    eager = train_mod.train(validate_recipe(recipe_dict(tmp_path / "eager", cuda_graphs=False,
                                                        adapter=adapter, packing=packing)))
    graphed = train_mod.train(validate_recipe(recipe_dict(tmp_path / "graphed", cuda_graphs=True,
                                                          adapter=adapter, packing=packing)))
    assert eager.step_losses[-1] < eager.step_losses[0]
    torch.testing.assert_close(torch.tensor(graphed.step_losses), torch.tensor(eager.step_losses),
                               rtol=1e-3, atol=0)
    assert graphed.final_eval_loss == pytest.approx(eager.final_eval_loss, rel=1e-3)


def _tiny_model(adapter_dropout=None, recompute=False):
    from mamba_ft.models import load_model, set_recompute_ssm

    model = load_model(dict(TINY_MAMBA), need_tokenizer=False, seed=0).model.cuda().train()
    if recompute:
        set_recompute_ssm(model, True)
    if adapter_dropout is not None:
        from mamba_ft.adapters import AdapterConfig, attach_adapters

        attach_adapters(model, AdapterConfig(targets=["all"], rank=4, dropout=adapter_dropout))
        with torch.no_grad():  # non-zero B, so the side paths (and their dropout) change the loss
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
    return model


def _micro_step(model):
    from mamba_ft.training.loss import next_token_loss_sum
    from mamba_ft.models import document_starts

    def micro_step(batch, scale):
        with document_starts(model, batch["starts"]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=batch["input_ids"]).logits
            loss = next_token_loss_sum(logits, batch["input_ids"], -100)
            (loss * scale).backward()
        return loss

    return micro_step


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute-ssm"])
def test_graphed_micro_steps_accumulate_like_eager(recompute):
    """Three optimizer steps of two accumulated micro-batches each, graphed vs eager, from the
    same weights: the same losses and parameters.

    Plain SGD, so a parameter moves by lr x its accumulated gradient: a graph that overwrote
    instead of accumulating, or missed a micro-batch, would move it by a different amount.
    (Adam would turn the scan backward's run-to-run noise, its fp32 atomic adds in another
    order, into differences of up to lr for near-zero gradients.) That noise is all that
    differs, about 1e-6 relative, hence rtol 1e-4.
    """
    from mamba_ft.training.cuda_graph import GraphedMicroStep

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 272, (2, 96), generator=g),
                "starts": torch.rand(2, 96, generator=g) < 0.05} for _ in range(6)]
    eager_model = _tiny_model(adapter_dropout=0.0, recompute=recompute)
    graphed_model = copy.deepcopy(eager_model)
    start = [p.detach().clone() for p in eager_model.parameters() if p.requires_grad]
    runs = {}
    for name, model in (("eager", eager_model), ("graphed", graphed_model)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5)
        step = _micro_step(model)
        if name == "graphed":
            step = GraphedMicroStep(step, params, torch.device("cuda"))
        losses = []
        for i, batch in enumerate(batches):
            batch = {k: v.cuda() for k, v in batch.items()}
            losses.append(step(batch, 0.5 / batch["input_ids"].numel()).item())
            if i % 2 == 1:
                opt.step()
                opt.zero_grad(set_to_none=name == "eager")
        runs[name] = (losses, [p.detach().clone() for p in params])
    torch.testing.assert_close(runs["graphed"][0], runs["eager"][0], rtol=1e-4, atol=0)
    moved = max((e - s).abs().max().item() for e, s in zip(runs["eager"][1], start))
    assert moved > 1e-3  # the steps changed the weights, so the comparison means something
    for graphed_p, eager_p in zip(runs["graphed"][1], runs["eager"][1]):
        torch.testing.assert_close(graphed_p, eager_p, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_replays_draw_fresh_dropout_and_refuse_other_shapes():
    from mamba_ft.training.cuda_graph import GraphedMicroStep

    model = _tiny_model(adapter_dropout=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    step = GraphedMicroStep(_micro_step(model), params, torch.device("cuda"))
    batch = {"input_ids": torch.randint(0, 272, (2, 64), device="cuda"),
             "starts": torch.zeros(2, 64, dtype=torch.bool, device="cuda")}
    losses = {float(step(batch, 0.0)) for _ in range(4)}
    assert len(losses) == 4  # a new dropout mask at each replay, so a new loss
    with pytest.raises(ValueError, match="replays fixed shapes"):
        step({"input_ids": batch["input_ids"][:, :32], "starts": batch["starts"][:, :32]}, 1.0)


@pytest.mark.gpu
def test_unreached_parameters_keep_no_gradient():
    """A parameter the backward never reaches keeps .grad None after capture, so the training
    loop's adapter check still names it."""
    from mamba_ft.training.cuda_graph import GraphedMicroStep

    model = _tiny_model()
    unused = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    params = [p for p in model.parameters() if p.requires_grad] + [unused]
    step = GraphedMicroStep(_micro_step(model), params, torch.device("cuda"))
    step({"input_ids": torch.randint(0, 272, (1, 32), device="cuda"),
          "starts": torch.zeros(1, 32, dtype=torch.bool, device="cuda")}, 1.0)
    assert unused.grad is None
    assert all(p.grad is not None for p in params[:-1])


@pytest.mark.gpu
def test_a_step_that_waits_on_the_host_is_a_user_error():
    """A forward that synchronises with the host (here `.item()`) cannot be captured: the
    user is told to turn run.cuda_graphs off, instead of a CUDA error."""
    from mamba_ft.training.cuda_graph import GraphedMicroStep

    model = _tiny_model()
    params = [p for p in model.parameters() if p.requires_grad]
    eager = _micro_step(model)

    def waits_on_host(batch, scale):
        loss = eager(batch, scale)
        if loss.item() > 1e9:  # a data-dependent branch: a host synchronisation
            loss = loss * 0
        return loss

    step = GraphedMicroStep(waits_on_host, params, torch.device("cuda"))
    batch = {"input_ids": torch.randint(0, 272, (1, 32), device="cuda"),
             "starts": torch.zeros(1, 32, dtype=torch.bool, device="cuda")}
    with pytest.raises(UserError, match="could not be captured as a CUDA graph.*run.cuda_graphs: false"):
        step(batch, 1.0)


@pytest.mark.gpu
def test_graphed_run_resumes_like_an_uninterrupted_one(tmp_path):
    """Checkpoint after 3 graphed steps, resume to 6 (a fresh capture): the same losses as 6
    graphed steps in one go (constant LR, so the two step counts share a schedule; rtol 1e-3
    for the scan backward's atomic-add order under bf16)."""
    def recipe(out, steps):
        d = recipe_dict(out, cuda_graphs=True, adapter={"targets": ["all"], "rank": 4}, packing=True)
        d["schedule"] = {"kind": "constant"}
        d["run"].update(max_steps=steps, save_every=3, resume="auto")
        return validate_recipe(d)

    whole = train_mod.train(recipe(tmp_path / "whole", 6))
    train_mod.train(recipe(tmp_path / "cut", 3))
    resumed = train_mod.train(recipe(tmp_path / "cut", 6))
    assert len(resumed.step_losses) == 6
    torch.testing.assert_close(torch.tensor(resumed.step_losses), torch.tensor(whole.step_losses),
                               rtol=1e-3, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", GRAPHED_BY_DEFAULT)
def test_auto_graphs_each_type_it_turns_on_for_like_eager(tmp_path, capsys, model_type):
    """What `graphs_by_default` promises: with the default `auto`, one GPU and packed rows, the
    step of this type is captured, and trains like eager (rtol 1e-3 under bf16, as above)."""
    def run(out, graphs):
        d = recipe_dict(out, cuda_graphs=graphs, adapter={"targets": ["all"], "rank": 4}, packing=True)
        d["model"]["source"] = dict(TINY_GRAPHED[model_type])
        return train_mod.train(validate_recipe(d))

    eager = run(tmp_path / "eager", False)
    graphed = run(tmp_path / "auto", "auto")
    assert graphed.cuda_graphs and not eager.cuda_graphs
    assert "run.cuda_graphs: auto -> on (one CUDA process" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(graphed.step_losses), torch.tensor(eager.step_losses),
                               rtol=1e-3, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", sorted(TINY_GRAPHED))
def test_graphed_training_of_each_pure_mamba_type_matches_eager(tmp_path, model_type):
    """`run.cuda_graphs: true` on each pure Mamba type (what `graphs_by_default` needs first):
    packed bf16 LoRA training replayed as a graph gives eager's losses (rtol 1e-3, as above)."""
    def run(out, graphs):
        d = recipe_dict(out, cuda_graphs=graphs, adapter={"targets": ["all"], "rank": 4}, packing=True)
        d["model"]["source"] = dict(TINY_GRAPHED[model_type])
        return train_mod.train(validate_recipe(d))

    eager, graphed = run(tmp_path / "eager", False), run(tmp_path / "graphed", True)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    torch.testing.assert_close(torch.tensor(graphed.step_losses), torch.tensor(eager.step_losses),
                               rtol=1e-3, atol=0)


@pytest.mark.gpu
def test_transformer_baseline_with_graphs_matches_eager(tmp_path):
    """The Pythia-style baseline (transformers' GPT-NeoX) under run.cuda_graphs: the same
    losses as eager (its attention has no atomics: rtol 1e-4 under bf16)."""
    neox = {"model_type": "gpt_neox", "vocab_size": 272, "hidden_size": 32, "num_attention_heads": 2,
            "intermediate_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 128}

    def recipe(out, graphs):
        d = recipe_dict(out, cuda_graphs=graphs, adapter={"targets": ["query_key_value"], "rank": 4})
        d["model"]["source"] = neox
        d["model"]["kind"] = "transformer"
        return validate_recipe(d)

    eager = train_mod.train(recipe(tmp_path / "eager", False))
    graphed = train_mod.train(recipe(tmp_path / "graphed", True))
    torch.testing.assert_close(torch.tensor(graphed.step_losses), torch.tensor(eager.step_losses),
                               rtol=1e-4, atol=0)
