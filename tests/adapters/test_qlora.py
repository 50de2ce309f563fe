"""QLoRA on the CPU: bitsandbytes nf4 / fp4 / int8 base weights under mamba-ft's adapters.

bitsandbytes 0.50 runs 4-bit (de)quantisation and 8-bit row-wise (de)quantisation on the CPU;
each test skips, saying why, when the installed bitsandbytes cannot quantise here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import MambaForCausalLM

from adapter_models import MAMBA2_VOCAB, VOCAB, ft_copy, plain_mamba, plain_mamba2, randomize_adapters
from bnb_support import needs_quantization
from mamba_ft.adapters import (AdapterConfig, adapter_parameters, attach_adapters,
                               check_adapter_gradients, merge_adapters, save_adapters)
from mamba_ft.errors import UserError
from mamba_ft.models import load_model, mixers, set_recompute_ssm
from mamba_ft.models.quantize import QuantizeConfig, dequantize_model, quantize_model
from mamba_ft.modules.quantized import dequantized_weight, is_quantized, projection_weight
from mamba_ft.ops.projections import channels_first_to_rows, rows_to_channels_first

REPO = Path(__file__).resolve().parents[2]
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'mamba-ft[qlora]')")


KINDS = ["nf4", "fp4", "int8"]


def quantized_tiny(kind: str = "nf4", seed: int = 0, tie: bool = True, **options):
    needs_quantization(kind)
    model = ft_copy(plain_mamba(seed, tie=tie))
    report = quantize_model(model, QuantizeConfig(kind=kind, **options))
    return model, report


@pytest.mark.parametrize("kind", KINDS)
def test_quantised_projections_equal_dequantised_weight_times_x(kind):
    model, report = quantized_tiny(kind)
    assert set(report.rows) == {"in_proj", "out_proj"} and report.rows["in_proj"][0] == 2
    mixer = mixers(model)[0]
    for name in ("x_proj", "dt_proj", "conv1d"):  # what stays in the compute dtype
        assert not is_quantized(getattr(mixer, name))
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    W_in = dequantized_weight(mixer.in_proj)
    out = rows_to_channels_first(x, projection_weight(mixer.in_proj))
    torch.testing.assert_close(out, (x @ W_in.T).transpose(1, 2), rtol=1e-5, atol=1e-6)
    y = torch.randn(2, 64, 7, generator=torch.Generator().manual_seed(1))
    W_out = dequantized_weight(mixer.out_proj)
    torch.testing.assert_close(channels_first_to_rows(y, projection_weight(mixer.out_proj)),
                               y.transpose(1, 2) @ W_out.T, rtol=1e-5, atol=1e-6)
    # The dequantised matrix is the quantisation of the original one (4-bit: about a tenth of
    # a weight's range per block; int8: 1/127 of each row's largest entry).
    original = plain_mamba(0).backbone.layers[0].mixer.in_proj.weight
    bound = 0.2 if kind != "int8" else 1.0 / 127
    assert (W_in - original).abs().max() <= bound * original.abs().max()
    if kind != "int8":  # bitsandbytes' own 4-bit matmul (its int8 one quantises x too), on
        # out_proj: rows of 64, a whole block (bitsandbytes' CPU kernel scrambles shorter rows)
        mixer.out_proj.train()
        y_rows = y.transpose(1, 2)
        torch.testing.assert_close(mixer.out_proj(y_rows), y_rows @ W_out.T, rtol=1e-5, atol=1e-6)


def test_quantised_projection_backward_reaches_input_and_side_path_not_base():
    model, _ = quantized_tiny("nf4")
    mixer = mixers(model)[0]
    W = dequantized_weight(mixer.in_proj)
    x = torch.randn(2, 5, 32, requires_grad=True)
    g = torch.randn(2, 128, 5)
    rows_to_channels_first(x, projection_weight(mixer.in_proj)).backward(g)
    x_ref = x.detach().clone().requires_grad_()
    (x_ref @ W.T).transpose(1, 2).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert mixer.in_proj.weight.grad is None and not mixer.in_proj.weight.requires_grad


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_every_adapter_target_gets_a_nonzero_gradient(kind, ids):
    model, _ = quantized_tiny(kind, modules=["in_proj", "out_proj", "x_proj", "dt_proj"])
    assert is_quantized(mixers(model)[1].x_proj)
    attach_adapters(model, AdapterConfig(targets=["all", "embeddings", "lm_head"], rank=3))
    randomize_adapters(model)
    model(ids, labels=ids).loss.backward()
    check_adapter_gradients(model)
    grads = {n: p.grad for n, p in adapter_parameters(model).items()}
    zero = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not zero, zero
    # Every target is there (in_proj ... dt_bias, embeddings, lm_head) and the base takes none.
    assert {"in_proj", "out_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "dt_bias"} <= {
        n.split(".")[-2] if "low_rank" in n else n.split(".")[-1] for n in grads if ".mixer." in n}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in grads)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_recompute_gives_the_same_gradients_on_a_quantised_base(family):
    if family == "mamba2":
        ids = torch.randint(3, MAMBA2_VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))
    else:
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    grads = []
    for recompute in (False, True):
        needs_quantization("nf4")
        model = ft_copy(plain_mamba2(0) if family == "mamba2" else plain_mamba(0))
        quantize_model(model, QuantizeConfig(kind="nf4"))
        attach_adapters(model, AdapterConfig(targets=["all"], rank=3))
        randomize_adapters(model)
        set_recompute_ssm(model, recompute)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in adapter_parameters(model).items()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_cached_decoding_equals_the_full_forward(kind, ids):
    model, _ = quantized_tiny(kind)
    attach_adapters(model, AdapterConfig(targets=["all", "embeddings", "lm_head"], rank=3))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache_params=out.cache_params, use_cache=True)
            steps.append(out.logits)
    # The same dequantised weights on both paths; a recurrence instead of a chunked scan.
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_gives_plain_transformers_with_the_dequantised_weights(kind, tmp_path, ids):
    needs_quantization(kind)
    base_dir = tmp_path / "base"
    plain_mamba(3).save_pretrained(base_dir)
    model = load_model(base_dir, need_tokenizer=False, quantize=QuantizeConfig(kind=kind)).model
    attach_adapters(model, AdapterConfig(targets=["all", "embeddings"], rank=3))
    randomize_adapters(model)
    with torch.no_grad():
        qlora_logits = model(ids).logits
    save_adapters(model, tmp_path / "adapter", base_model=str(base_dir))
    meta = json.loads((tmp_path / "adapter" / "mamba_ft_adapter.json").read_text())
    assert meta["base_quantization"]["kind"] == kind

    # `mamba-ft merge` needs a tokenizer beside the base; the in-process merge does not.
    expected_in_proj = dequantized_weight(mixers(model)[0].in_proj).clone()
    delta = mixers(model)[0].adapter.low_rank["in_proj"].delta().detach()
    merge_adapters(model)
    assert not any(is_quantized(m) for m in model.modules())
    torch.testing.assert_close(mixers(model)[0].in_proj.weight, expected_in_proj + delta)
    model.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = MambaForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(plain.backbone.layers[0].mixer).__module__.startswith("transformers")
    with torch.no_grad():
        merged_logits = plain(ids).logits
    # fp32 throughout; transformers' own mixer and side paths vs merged weights: rounding only.
    torch.testing.assert_close(merged_logits, qlora_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("modules,targets", [
    (None, ["all"]),
    # The embeddings quantised too: the bundled model's 96-wide rows straddle 4-bit blocks (the
    # whole-table lookup), and the embedding adapter merges into the rebuilt table.
    (["in_proj", "out_proj", "embeddings"], ["all", "embeddings"]),
])
def test_merge_cli_rebuilds_the_quantised_base(modules, targets, tmp_path, ids):
    """`mamba-ft merge` re-quantises the recorded base as it was quantised before merging."""
    needs_quantization("nf4")
    base = tmp_path / "base"
    loaded = load_model("bundled:tiny-mamba")
    loaded.model.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
    config = QuantizeConfig(kind="nf4", **({"modules": modules} if modules else {}))
    qmodel = load_model(base, quantize=config).model
    attach_adapters(qmodel, AdapterConfig(targets=targets, rank=2))
    randomize_adapters(qmodel, std=0.02)
    with torch.no_grad():
        qlora_logits = qmodel(ids).logits
    save_adapters(qmodel, tmp_path / "adapter", base_model=str(base))
    from mamba_ft.cli import main

    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) in (0, None)
    with torch.no_grad():
        merged = MambaForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(merged, qlora_logits, rtol=1e-4, atol=1e-4)
    # Against the unquantised base the merge would differ by the quantisation error.
    with torch.no_grad():
        assert (load_model(base).model(ids).logits - qlora_logits).abs().max() > 1e-2


def test_quickstart_recipe_trains_an_nf4_base(tmp_path):
    # About 5 s on a 2-core CPU: cheap enough for the default tier.
    needs_quantization("nf4")
    from mamba_ft.training import loop

    result = loop.train_from_recipe(str(REPO / "recipes/quickstart.yaml"), [
        f"run.output_dir={tmp_path / 'run'}", "run.max_steps=6", "run.save_every=0",
        "run.eval_batches=2", "logging.progress_bar=false", "logging.plot=false",
        "model.quantize=nf4"])
    assert result.final_eval_loss < 0.7 * result.initial_eval_loss
    assert result.step_losses[-1] < result.step_losses[0]
    meta = json.loads((tmp_path / "run" / "adapter" / "mamba_ft_adapter.json").read_text())
    assert meta["base_quantization"] == {"kind": "nf4", "compute_dtype": "float32",
                                         "modules": ["in_proj", "out_proj"], "double_quant": True}


def test_report_counts_the_matrix_and_shows_the_bytes():
    model, report = quantized_tiny("nf4")
    text = report.format()
    assert "in_proj" in text and "kept in float32: x_proj, dt_proj, conv1d" in text
    count, params, before, after = report.rows["in_proj"]
    assert params == 2 * 128 * 32 and before == 4 * params
    # Two weights a byte, plus per module the block scales (double-quantised: a byte per 64
    # weights) and two 256-entry fp32 code books, which dominate only at this tiny size.
    assert params / 2 < after < params / 2 + count * 2 * 1024 + params / 64 + count * 64
    adapters = attach_adapters(model, AdapterConfig(targets=["in_proj"], rank=2))
    unquantised = attach_adapters(ft_copy(plain_mamba(0)), AdapterConfig(targets=["in_proj"], rank=2))
    assert adapters.base_parameters == unquantised.base_parameters


def test_prequantised_checkpoint_loads_when_it_agrees_and_is_refused_when_not(tmp_path, ids):
    needs_quantization("nf4")
    from transformers import BitsAndBytesConfig

    saved = tmp_path / "nf4"
    q = MambaForCausalLM.from_pretrained(
        REPO / "mamba_ft/bundled/tiny-mamba", device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    q.save_pretrained(saved)
    loaded = load_model(saved, need_tokenizer=False, quantize=QuantizeConfig(kind="nf4"))
    # transformers quantises every mixer Linear; the checkpoint's choice is taken and reported.
    assert set(loaded.quantization.rows) == {"in_proj", "out_proj", "x_proj", "dt_proj"}
    assert loaded.quantization.source == "saved quantised"
    model = loaded.model
    with torch.no_grad():
        logits = model(ids).logits
        dequantize_model(model)
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    for quantize, message in ((None, "saved quantised .nf4.* but model.quantize is none"),
                              (QuantizeConfig(kind="int8"), "model.quantize is int8"),
                              (QuantizeConfig(kind="nf4", double_quant=True), "double_quant is true"),
                              (QuantizeConfig(kind="nf4", modules=["in_proj", "out_proj"]),
                               "set modules to \\[dt_proj, in_proj, out_proj, x_proj\\]"),
                              (QuantizeConfig(kind="nf4", modules=["in_proj", "out_proj", "embeddings"]),
                               "keeps its embeddings in full precision")):
        with pytest.raises(UserError, match=message):
            load_model(saved, need_tokenizer=False, quantize=quantize)


def test_bad_quantisation_settings_are_one_clear_error(tmp_path, monkeypatch, capsys):
    from mamba_ft.cli import main
    from mamba_ft.recipe import load_recipe

    recipe = str(REPO / "recipes/quickstart.yaml")
    out = f"run.output_dir={tmp_path / 'run'}"
    cases = [
        (["model.quantize=nf5"], "unknown quantisation 'nf5' .choose one of none, nf4, fp4, int8. Did you mean 'nf4'"),
        (["model.quantize={kind: int8, double_quant: true}"], "double_quant applies to the 4-bit formats"),
        (["model.quantize={kind: nf4, modules: [conv1d]}"], "'conv1d' cannot be quantised"),
        (["model.quantize={kind: nf4, modules: [lm_head]}"],
         "lm_head cannot be quantised on its own: .* casts the hidden states to lm_head.weight.dtype.*"
         "name 'embeddings' instead"),
        (["model.quantize={kind: nf4, modules: [embeddings, lm_head]}"], "lm_head cannot be quantised on its own"),
        (["model.quantize=nf4", "adapter=none"], "add an adapter section"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            load_recipe(recipe, [out, *overrides])
    # The embeddings are a valid choice (docs/quantization.md; tests/adapters/test_qlora_embeddings.py).
    recipe_ok = load_recipe(recipe, [out, "model.quantize={kind: nf4, modules: [in_proj, out_proj, embeddings]}"])
    assert recipe_ok.model.quantize.modules == ["in_proj", "out_proj", "embeddings"]
    # Through the CLI: exit code 2 and one line.
    assert main(["train", recipe, out, "model.quantize=nf5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mamba-ft: error:") and "nf5" in err[0]

    # A Transformer baseline is quantised by transformers' rule (test_qlora_transformer_baseline.py);
    # Mamba module names are refused there.
    with pytest.raises(UserError, match="which are Mamba modules"):
        load_model("bundled:tiny-gpt-neox", need_tokenizer=False, allow_transformers=True,
                   quantize=QuantizeConfig(kind="nf4", modules=["in_proj", "out_proj"]))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs bitsandbytes.*pip install 'mamba-ft\[qlora\]'"):
        quantize_model(ft_copy(plain_mamba()), QuantizeConfig(kind="nf4"))
