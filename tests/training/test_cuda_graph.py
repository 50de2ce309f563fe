"""run.cuda_graphs: the graphed micro-step (mamba_ft.training.cuda_graph) trains exactly like the eager one.

On the CPU: the recipe and launch checks, and fixed-length batches. On a GPU (`-m gpu`): a
tiny Mamba trained with the micro-step replayed as a CUDA graph against the same model
trained eagerly, through the training loop and through `GraphedMicroStep` directly; a
graphed run resumed from a checkpoint; the Transformer baseline graphed against eager.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mamba_ft.training.loop as train_mod
import mamba_ft.training.setup as setup_mod
import mamba_ft.training.step as step_mod
from mamba_ft.training import run_dir
from mamba_ft import data as data_lib
from mamba_ft.errors import UserError
from mamba_ft.recipe import validate_recipe

TINY_MAMBA = {"model_type": "mamba", "vocab_size": 272, "hidden_size": 32, "state_size": 8,
              "num_hidden_layers": 2, "expand": 2, "conv_kernel": 4}


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
