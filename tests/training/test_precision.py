"""Precision policy: which parameters stay fp32, bf16 autocast training keeps fp32 masters,
fp16 refused on CPU, fp16 loss scaling skips and counts overflow steps (GPU), tf32 switch."""

import copy

import pytest
import torch

import mamba_ft.training.loop as train_mod
from mamba_ft import precision
from mamba_ft.adapters import AdapterConfig, adapter_parameters, attach_adapters
from mamba_ft.errors import UserError
from mamba_ft.models import load_model
from mamba_ft.recipe import validate_recipe

TINY = {"model_type": "mamba", "vocab_size": 272, "hidden_size": 16, "state_size": 4,
        "num_hidden_layers": 2, "expand": 2, "conv_kernel": 4}


def tiny():
    return load_model(TINY, need_tokenizer=False, seed=0).model


def recipe(out, mode, **extra):
    return validate_recipe({
        "model": {"source": dict(TINY), "tokenizer": "bundled:tokenizer", "init_seed": 0},
        "precision": {"mode": mode, **extra},
        "data": {"train": {"icl_rules": {"n_documents": 16, "seed": 0, "min_demos": 1, "max_demos": 3}},
                 "max_length": 48},
        "optim": {"lr": 1e-2},
        "run": {"output_dir": str(out), "max_steps": 2, "micro_batch_size": 4},
        "logging": {"progress_bar": False, "plot": False},
    })


def test_fp32_names_are_the_recurrence_parameters_and_norms():
    model = tiny()
    expected = {f"backbone.layers.{i}.{name}" for i in range(2)
                for name in ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias", "norm.weight")}
    expected.add("backbone.norm_f.weight")
    assert set(precision.fp32_parameter_names(model)) == expected


def test_enforce_fp32_restores_sensitive_and_adapter_weights():
    model = tiny()
    attach_adapters(model, AdapterConfig(targets=["in_proj", "A_log"], rank=2))
    model.to(torch.bfloat16)
    precision.enforce_fp32(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    for name in precision.fp32_parameter_names(model) + list(adapter_parameters(model)):
        assert dtypes[name] == torch.float32, name
    # Frozen bulk weights may stay in half precision (they are only read).
    assert dtypes["backbone.layers.0.mixer.in_proj.weight"] == torch.bfloat16


NEOX = {"model_type": "gpt_neox", "vocab_size": 272, "hidden_size": 16, "num_attention_heads": 2,
        "intermediate_size": 32, "num_hidden_layers": 2, "max_position_embeddings": 64}


def bf16_against_fp32(tmp_path, config):
    from mamba_ft.models import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source("bundled:tokenizer"), "tokenizer")
    runs = {}
    for mode in ("fp32", "bf16"):
        model = load_model(config, need_tokenizer=False, seed=0, allow_transformers=True).model
        runs[mode] = train_mod.train(recipe(tmp_path / mode, mode), model=model, tokenizer=tok)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    # bf16 keeps ~3 significant digits in the matmuls; the loss itself is reduced in fp32.
    assert runs["bf16"].step_losses == pytest.approx(runs["fp32"].step_losses, rel=2e-2)
    assert runs["bf16"].step_losses != runs["fp32"].step_losses  # autocast really ran


def test_bf16_autocast_training_keeps_fp32_masters_transformer(tmp_path):
    bf16_against_fp32(tmp_path, NEOX)


def test_bf16_autocast_training_keeps_fp32_masters_mamba(tmp_path):
    bf16_against_fp32(tmp_path, TINY)


def test_fp16_needs_a_gpu():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        precision.mixed_precision_for("fp16", torch.device("cpu"))


def test_tf32_switch():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        precision.set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        precision.set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        precision.set_tf32(before)


@pytest.mark.gpu
def test_fp16_overflow_steps_are_skipped_and_counted(tmp_path):
    # A loss scale of 2**100 overflows fp16 gradients (max 65504): the scaler skips the step,
    # halves the scale and the parameters stay exactly as they were. (On the Transformer
    # baseline: the loss-scaling logic is the trainer's, whatever the model.)
    from mamba_ft.models import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source("bundled:tokenizer"), "tokenizer")
    start = load_model(NEOX, need_tokenizer=False, seed=0, allow_transformers=True).model
    model = copy.deepcopy(start).cuda()
    result = train_mod.train(recipe(tmp_path / "over", "fp16", fp16_init_scale=2.0 ** 100), model=model,
                             tokenizer=tok)
    assert result.skipped_steps == 2
    for p, q in zip(model.parameters(), start.parameters()):
        assert torch.equal(p.detach().cpu(), q)
    ok = train_mod.train(recipe(tmp_path / "ok", "fp16"), model=copy.deepcopy(start).cuda(), tokenizer=tok)
    assert ok.skipped_steps == 0 and ok.step_losses[-1] < ok.step_losses[0]
