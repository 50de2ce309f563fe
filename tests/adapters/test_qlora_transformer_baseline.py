"""QLoRA for a Transformer baseline on the CPU: `model.quantize` on a tiny GPT-NeoX.

The Linears of the decoder layers become bitsandbytes' Linear4bit / Linear8bitLt through
transformers' own `replace_with_bnb_linear` (the head and embeddings stay in fp32), PEFT's
bitsandbytes LoRA layers train on top, and the merge folds the adapters into the dequantised
weights. The tiny model is 64 wide (intermediate 128): bitsandbytes' CPU 4-bit matmul needs
rows of whole 64-weight blocks (`quantize_transformer` refuses other widths on a CPU-only
machine). Each test skips, saying why, when bitsandbytes cannot quantise here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bnb_support import assert_adapter_grads_match_twin, needs_quantization
from mamba_ft.adapters import (AdapterConfig, adapter_parameters, attach_adapters, merge_adapters,
                               save_adapters)
from mamba_ft.errors import UserError
from mamba_ft.models import load_model
from mamba_ft.models.quantize import QuantizeConfig, base_weight_bytes, dequantize_model
from mamba_ft.modules.quantized import dequantized_weight, is_quantized

REPO = Path(__file__).resolve().parents[2]
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'mamba-ft[qlora]')")

NEOX = {"model_type": "gpt_neox", "vocab_size": 272, "hidden_size": 64, "num_attention_heads": 2,
        "num_hidden_layers": 2, "intermediate_size": 128, "max_position_embeddings": 64,
        "tie_word_embeddings": False}
LINEARS = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


def neox(kind: str | None = None, seed: int = 0, **options):
    if kind is not None:
        needs_quantization(kind)
    return load_model(NEOX, need_tokenizer=False, allow_transformers=True, seed=seed,
                      quantize=None if kind is None else QuantizeConfig(kind=kind, **options))


def lora_ids():
    return torch.randint(0, 272, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.seam  # transformers' replace_with_bnb_linear, get_keys_to_not_convert, should_convert_module
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_decoder_linears_are_quantised_and_equal_dequantised_weight_times_x(kind):
    original = neox(seed=0).model
    loaded = neox(kind, seed=0)
    model = loaded.model
    cls = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    quantised = {n: m for n, m in model.named_modules() if is_quantized(m)}
    # Every Linear of the decoder layers, as transformers' integration does; nothing else.
    assert {n.rsplit(".", 1)[-1] for n in quantised} == LINEARS and len(quantised) == 8
    assert all(type(m) is cls and ".layers." in n for n, m in quantised.items())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.gpt_neox.embed_in) is nn.Embedding
    assert getattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit") is True
    originals = dict(original.named_modules())
    gen = torch.Generator().manual_seed(0)
    for name, module in quantised.items():
        x = torch.randn(3, 5, module.in_features, generator=gen)
        W = dequantized_weight(module).float()
        with torch.no_grad():
            out = module(x)  # bitsandbytes' own forward, the one PEFT's LoRA layer calls
        torch.testing.assert_close(out, x @ W.T + module.bias, rtol=1e-5, atol=1e-5, msg=name)
        # The dequantised matrix is the quantisation of the original one; the bias is as it was.
        W0 = originals[name].weight
        bound = 0.2 if kind != "int8" else 1.0 / 127
        assert (W - W0).abs().max() <= bound * W0.abs().max(), name
        torch.testing.assert_close(module.bias, originals[name].bias, rtol=0, atol=0)
    if kind != "int8":  # (int8 in eval mode is LLM.int8(): it quantises the activations too)
        # Eval mode computes the same (bitsandbytes' CPU inference repacking is off), and a
        # training forward after it still works (the repacked weight used to break it).
        module.eval()
        with torch.no_grad():
            torch.testing.assert_close(module(x), x @ W.T + module.bias, rtol=1e-5, atol=1e-5)
        module.train()
        x.requires_grad_()
        module(x).sum().backward()
        torch.testing.assert_close(x.grad, W.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_report_counts_the_quantised_bytes():
    full = neox(seed=0).model
    loaded = neox("nf4", seed=0)
    report, model = loaded.quantization, loaded.model
    assert report.transformer and set(report.rows) == LINEARS
    count, params, before, after = report.rows["query_key_value"]
    assert (count, params, before) == (2, 2 * 192 * 64, 2 * 192 * 64 * 4)
    # Two weights a byte, plus per module the block scales and code books.
    assert params / 2 < after < params / 2 + count * 2 * 1024 + params / 64 + count * 64
    saved = sum(r[2] - r[3] for r in report.rows.values())
    assert report.base_bytes == base_weight_bytes(model) == base_weight_bytes(full) - saved
    text = report.format()
    assert "dense_h_to_4h" in text and "kept in float32: norms, embeddings, lm_head" in text
    # The adapter file's record rebuilds the same quantisation (no Mamba module names in it).
    assert report.record() == {"kind": "nf4", "compute_dtype": "float32", "double_quant": True}
    QuantizeConfig.model_validate(report.record())
    # The adapter report counts a quantised matrix by its elements, as on the full model.
    quantised = attach_adapters(model, AdapterConfig(targets=["all"], rank=2))
    unquantised = attach_adapters(full, AdapterConfig(targets=["all"], rank=2))
    assert quantised.base_parameters == unquantised.base_parameters


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_every_lora_gets_the_gradient_of_the_dequantised_twin(kind):
    model = neox(kind, seed=0).model
    twin = copy.deepcopy(model)
    dequantize_model(twin)  # plain Linears holding the same (dequantised) weights
    assert not any(is_quantized(m) for m in twin.modules())
    config = AdapterConfig(targets=["all"], rank=3)
    attach_adapters(model, config)
    attach_adapters(twin, config)
    wrapper = model.gpt_neox.layers[0].attention.query_key_value
    assert type(wrapper).__module__ == "peft.tuners.lora.bnb"  # PEFT's bitsandbytes LoRA layer
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            adapter_parameters(twin)[name].copy_(p)
    ids = lora_ids()
    model(ids, labels=ids).loss.backward()
    twin(ids, labels=ids).loss.backward()
    grads = assert_adapter_grads_match_twin(model, twin, rtol=1e-4)
    assert len(grads) == 16 and all(torch.isfinite(g).all() for g in grads.values())
    # The base takes none.
    assert all(p.grad is None for n, p in model.named_parameters() if n not in grads)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_cli_folds_lora_into_the_dequantised_base(kind, tmp_path):
    needs_quantization(kind)
    from transformers import GPTNeoXForCausalLM

    from mamba_ft.cli import main

    base = tmp_path / "base"
    plain = neox(seed=3)
    plain.model.save_pretrained(base)
    load_model("bundled:tiny-mamba").tokenizer.save_pretrained(base)
    model = load_model(base, allow_transformers=True, quantize=QuantizeConfig(kind=kind)).model
    attach_adapters(model, AdapterConfig(targets=["all"], rank=3))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = lora_ids()
    # Training mode, as the logits the adapters were trained on: bitsandbytes' int8 forward in
    # eval mode quantises the activations too (LLM.int8()); in training mode on the CPU it
    # multiplies by the dequantised matrix. (No dropout in this model or its adapters.)
    model.train()
    with torch.no_grad():
        qlora_logits = model(ids).logits
    save_adapters(model, tmp_path / "adapter", base_model=str(base))
    meta = json.loads((tmp_path / "adapter" / "mamba_ft_adapter.json").read_text())
    assert meta["base_quantization"]["kind"] == kind and "modules" not in meta["base_quantization"]

    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) in (0, None)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = GPTNeoXForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(is_quantized(m) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, qlora_logits, rtol=1e-4, atol=1e-4)
        # Against the unquantised base the merge would differ by the quantisation error.
        assert (plain.model.eval()(ids).logits - qlora_logits).abs().max() > 1e-3

    # In memory too: the same logits, plain Linears holding dequantised weight + delta.
    again = load_model(base, need_tokenizer=False, allow_transformers=True,
                       quantize=QuantizeConfig(kind=kind)).model
    from mamba_ft.adapters import load_adapters

    load_adapters(again, tmp_path / "adapter")
    layer = again.gpt_neox.layers[1].mlp.dense_4h_to_h
    expected = dequantized_weight(layer.get_base_layer()).float() + layer.get_delta_weight("default")
    merge_adapters(again)
    assert type(again.gpt_neox.layers[1].mlp.dense_4h_to_h) is nn.Linear
    torch.testing.assert_close(again.gpt_neox.layers[1].mlp.dense_4h_to_h.weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, qlora_logits, rtol=1e-4, atol=1e-4)


def test_training_loop_trains_an_nf4_gpt_neox(tmp_path):
    # The quickstart recipe on the tiny GPT-NeoX (random init) with model.quantize=nf4.
    needs_quantization("nf4")
    from mamba_ft.training import loop

    source = tmp_path / "neox.json"
    source.write_text(json.dumps(NEOX))
    result = loop.train_from_recipe(str(REPO / "recipes/quickstart.yaml"), [
        f"run.output_dir={tmp_path / 'run'}", "run.max_steps=8", "run.save_every=0",
        "run.eval_batches=2", "logging.progress_bar=false", "logging.plot=false",
        f"model.source={source}", "model.tokenizer=bundled:tiny-mamba", "model.quantize=nf4"])
    assert result.final_eval_loss < result.initial_eval_loss
    assert result.step_losses[-1] < result.step_losses[0]
    assert all(torch.isfinite(torch.tensor(result.step_losses)))
    meta = json.loads((tmp_path / "run" / "adapter" / "mamba_ft_adapter.json").read_text())
    assert meta["base_quantization"] == {"kind": "nf4", "compute_dtype": "float32", "double_quant": True}


def test_modules_for_a_transformer_is_one_clear_error(tmp_path, capsys):
    needs_quantization("nf4")
    for modules in (["in_proj", "out_proj"], ["embeddings"], ["in_proj", "out_proj", "x_proj"]):
        loaded = neox(seed=0)
        with pytest.raises(UserError, match=r"model.quantize.modules names .*which are Mamba modules; "
                                            r".* is a Transformer baseline, where model.quantize "
                                            r"quantises every Linear of its decoder layers.*"
                                            r"Remove model.quantize.modules"):
            from mamba_ft.models.quantize import quantize_model

            quantize_model(loaded.model, QuantizeConfig(kind="nf4", modules=modules))
        assert not any(is_quantized(m) for m in loaded.model.modules())  # nothing was done
    # Through the CLI: exit code 2 and one line.
    from mamba_ft.cli import main

    source = tmp_path / "neox.json"
    source.write_text(json.dumps(NEOX))
    assert main(["train", str(REPO / "recipes/quickstart.yaml"), f"run.output_dir={tmp_path / 'run'}",
                 f"model.source={source}", "model.tokenizer=bundled:tiny-mamba",
                 "model.quantize={kind: nf4, modules: [in_proj, out_proj]}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mamba-ft: error:") and "Mamba modules" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal applies where only the CPU runs the model")
def test_widths_the_cpu_4bit_matmul_gets_wrong_are_refused():
    needs_quantization("nf4")
    # The bundled tiny GPT-NeoX is 96 wide: bitsandbytes' CPU 4-bit matmul scrambles such rows.
    loaded = load_model("bundled:tiny-gpt-neox", need_tokenizer=False, allow_transformers=True)
    from mamba_ft.models.quantize import quantize_model

    with pytest.raises(UserError, match=r"not a multiple of 64.*query_key_value: 96.*model.quantize: int8"):
        quantize_model(loaded.model, QuantizeConfig(kind="nf4"))
    assert not any(is_quantized(m) for m in loaded.model.modules())
    # int8 has no blocks: it works at any width.
    needs_quantization("int8")
    assert quantize_model(loaded.model, QuantizeConfig(kind="int8")).rows["query_key_value"][0] == 4


@pytest.mark.seam  # transformers' loading of a bitsandbytes checkpoint (device maps, accelerate)
def test_prequantised_transformer_checkpoint_is_reported(tmp_path):
    needs_quantization("nf4")
    from transformers import BitsAndBytesConfig, GPTNeoXForCausalLM

    neox(seed=0).model.save_pretrained(tmp_path / "base")
    q = GPTNeoXForCausalLM.from_pretrained(
        tmp_path / "base", device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    q.save_pretrained(tmp_path / "nf4")
    loaded = load_model(tmp_path / "nf4", need_tokenizer=False, allow_transformers=True,
                        quantize=QuantizeConfig(kind="nf4"))
    report = loaded.quantization
    assert report.source == "saved quantised" and set(report.rows) == LINEARS and report.transformer
    with pytest.raises(UserError, match="which are Mamba modules"):
        load_model(tmp_path / "nf4", need_tokenizer=False, allow_transformers=True,
                   quantize=QuantizeConfig(kind="nf4", modules=["in_proj", "out_proj"]))
