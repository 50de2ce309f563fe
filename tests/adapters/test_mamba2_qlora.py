"""QLoRA for Mamba-2 on the CPU: bitsandbytes nf4 / fp4 / int8 in_proj and out_proj under
mamba-ft's Mamba-2 mixer and its adapters.

References: the dequantised matrix times x (the quantised projection must compute exactly
that; fp32, rounding only), the same model with the quantised modules replaced by plain Linears
holding the dequantised weights (`dequantize_model`: every other op identical, so the QLoRA
model's logits and gradients must equal it), and transformers' own Mamba2ForCausalLM for the
merged checkpoint.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import DynamicCache, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from adapter_models import MAMBA2_VOCAB, ft_copy, plain_mamba2, randomize_adapters
from bnb_support import assert_adapter_grads_match_twin, needs_quantization
from mamba_ft.adapters import AdapterConfig, attach_adapters, merge_adapters, save_adapters
from mamba_ft.errors import UserError
from mamba_ft.models import load_model, mixers
from mamba_ft.models.quantize import QuantizeConfig, dequantize_model, quantize_model
from mamba_ft.modules.quantized import dequantized_weight, is_quantized, projection_weight
from mamba_ft.ops.projections import rows

EVERYTHING = ["all", "embeddings", "lm_head"]
CACHE = "cache" if "cache" in inspect.signature(Mamba2ForCausalLM.forward).parameters else "cache_params"


@pytest.fixture
def ids() -> torch.Tensor:
    # 21 positions: not a multiple of the chunk (8).
    return torch.randint(3, MAMBA2_VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))


def quantized_tiny2(kind: str = "nf4", seed: int = 0, **options):
    needs_quantization(kind)
    model = ft_copy(plain_mamba2(seed))
    return model, quantize_model(model, QuantizeConfig(kind=kind, **options))


def dequantized_twin(model):
    """The same model (adapters included) with plain Linears holding the dequantised weights."""
    twin = copy.deepcopy(model)
    assert dequantize_model(twin) == 4  # in_proj and out_proj of both layers
    return twin


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantised_rows_projection_equals_dequantised_weight_times_x(kind):
    model, report = quantized_tiny2(kind)
    assert set(report.rows) == {"in_proj", "out_proj"} and report.rows["in_proj"][0] == 2
    mixer = mixers(model)[0]
    assert not is_quantized(mixer.conv1d)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    W = dequantized_weight(mixer.in_proj)
    out = rows(x, projection_weight(mixer.in_proj))
    torch.testing.assert_close(out, x @ W.T, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, g @ W, rtol=1e-5, atol=1e-6)
    assert mixer.in_proj.weight.grad is None and not mixer.in_proj.weight.requires_grad
    # The dequantised matrix is bitsandbytes' own round trip of the original weight (4-bit with
    # double quantisation, the default; int8 row-wise).
    import bitsandbytes.functional as bf

    original = plain_mamba2(0).backbone.layers[0].mixer.in_proj.weight.detach()
    if kind == "int8":
        expected = bf.int8_vectorwise_dequant(*bf.int8_vectorwise_quant(original.half())[:2])
    else:
        # Through bitsandbytes' 1-D path: its CPU kernel scrambles 2-D rows shorter than a
        # block (in_proj's rows here are 32 wide), which mamba-ft's dequantisation avoids.
        flat = bf.dequantize_4bit(*bf.quantize_4bit(original.flatten(), quant_type=kind,
                                                    compress_statistics=True))
        expected = flat.reshape(original.shape)
    torch.testing.assert_close(W, expected.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_model_equals_its_dequantised_twin_in_logits_and_gradients(kind, ids):
    model, _ = quantized_tiny2(kind)
    attach_adapters(model, AdapterConfig(targets=EVERYTHING, rank=3))
    randomize_adapters(model)
    twin = dequantized_twin(model)
    model(ids, labels=ids).loss.backward()
    twin(ids, labels=ids).loss.backward()
    ours = assert_adapter_grads_match_twin(model, twin, rtol=1e-5)
    # Every Mamba-2 target is there, and the frozen base takes no gradient.
    assert {"in_proj", "out_proj", "conv1d", "norm", "A_log", "D", "dt_bias"} <= {
        n.split(".")[-2] if "low_rank" in n else n.split(".")[-1] for n in ours if ".mixer." in n}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in ours)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_cached_decoding_on_a_quantised_mamba2_equals_the_full_forward(kind, ids):
    model, _ = quantized_tiny2(kind)
    attach_adapters(model, AdapterConfig(targets=EVERYTHING, rank=3))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        # Prefill 6 (inside a chunk), chunked prefill to 17 (across chunks), one-token steps.
        parts = [model(ids[:, :6], **{CACHE: cache}, use_cache=True).logits,
                 model(ids[:, 6:17], **{CACHE: cache}, use_cache=True).logits]
        parts += [model(ids[:, t:t + 1], **{CACHE: cache}, use_cache=True).logits
                  for t in range(17, ids.shape[1])]
    # The same dequantised weights on every path; a recurrence instead of the chunked scan.
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_of_a_mamba2_qlora_adapter_gives_plain_transformers(kind, tmp_path, ids):
    needs_quantization(kind)
    base_dir = tmp_path / "base"
    plain_mamba2(3).save_pretrained(base_dir)
    loaded = load_model(base_dir, need_tokenizer=False, quantize=QuantizeConfig(kind=kind))
    model = loaded.model
    assert "kept in float32: conv1d, A_log, D, dt_bias, norms, embeddings, lm_head" in \
        loaded.quantization.format()
    attach_adapters(model, AdapterConfig(targets=["all", "embeddings"], rank=3))
    randomize_adapters(model)
    with torch.no_grad():
        qlora_logits = model(ids).logits
    save_adapters(model, tmp_path / "adapter", base_model=str(base_dir))
    merge_adapters(model)
    assert not any(is_quantized(m) for m in model.modules())
    model.save_pretrained(tmp_path / "merged")
    plain = Mamba2ForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(plain.backbone.layers[0].mixer) is Mamba2Mixer
    with torch.no_grad():
        merged_logits = plain(ids).logits
    # fp32; transformers' own SSD and mixer against mamba-ft's reference: summation order only.
    torch.testing.assert_close(merged_logits, qlora_logits, rtol=1e-4, atol=1e-4)


def test_mamba2_modules_that_do_not_exist_are_refused_by_name():
    needs_quantization("nf4")
    model = ft_copy(plain_mamba2(0))
    with pytest.raises(UserError, match="names x_proj, which MambaFTMamba2Mixer does not have; "
                                        "this model can quantise in_proj, out_proj"):
        quantize_model(model, QuantizeConfig(kind="nf4", modules=["in_proj", "x_proj"]))
    assert not any(is_quantized(m) for m in model.modules())  # nothing half-done
