"""Quantised embeddings (`model.quantize.modules: [..., embeddings]`) on the CPU: mamba-ft's
`QuantizedEmbedding` and the `QuantizedTiedHead` that reads its table, for nf4 / fp4 / int8,
Mamba-1 (tied head) and Mamba-2 (tied and untied).

References: the dequantised table (a lookup must equal `F.embedding` of it, the tied head
`hidden @ tableᵀ`; fp32, rounding only), bitsandbytes' own flat round trip of the original table,
the same model with every quantised module replaced by a plain one holding the dequantised
weights (`dequantize_model`: logits and gradients must equal it), and transformers' own
Mamba / Mamba-2 for the merged checkpoint. d_model 64 makes each table row whole 64-weight
blocks (the rows-only lookup); 32 makes rows straddle blocks (the whole-table lookup).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, Mamba2ForCausalLM, MambaForCausalLM

from adapter_models import MAMBA2_VOCAB, VOCAB, ft_copy, plain_mamba, plain_mamba2, randomize_adapters
from bnb_support import assert_adapter_grads_match_twin, needs_quantization
from mamba_ft.adapters import (AdapterConfig, adapter_parameters, attach_adapters, load_adapters,
                               merge_adapters, save_adapters)
from mamba_ft.adapters.merge import dequantize_keeping_adapters
from mamba_ft.errors import UserError
from mamba_ft.models import load_model
from mamba_ft.models.quantize import (QuantizeConfig, base_weight_bytes, dequantize_model,
                                      quantize_model)
from mamba_ft.modules.quantized import (QuantizedEmbedding, QuantizedTiedHead, dequantized_weight,
                                        is_quantized)

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'mamba-ft[qlora]')")

WITH_EMBEDDINGS = ["in_proj", "out_proj", "embeddings"]
EVERYTHING = ["all", "embeddings", "lm_head"]
# transformers 5.24 renamed the cache keyword (and output field) `cache_params` to `cache`.
CACHE1 = "cache" if "cache" in inspect.signature(MambaForCausalLM.forward).parameters else "cache_params"
CACHE2 = "cache" if "cache" in inspect.signature(Mamba2ForCausalLM.forward).parameters else "cache_params"


def quantized(family: str, kind: str = "nf4", hidden: int = 64, tie: bool = True, seed: int = 0, **options):
    """A tiny Mamba-1 / Mamba-2 with mamba-ft's mixers, in_proj, out_proj and the embeddings
    quantised; (model, report, the unquantised original)."""
    needs_quantization(kind)
    plain = (plain_mamba(seed, hidden_size=hidden, tie=tie) if family == "mamba"
             else plain_mamba2(seed, hidden_size=hidden, tie=tie))
    model = ft_copy(plain)
    report = quantize_model(model, QuantizeConfig(kind=kind, modules=WITH_EMBEDDINGS, **options))
    return model, report, plain


def token_ids(family: str, length: int = 21, seed: int = 7) -> torch.Tensor:
    low, high = (0, VOCAB) if family == "mamba" else (3, MAMBA2_VOCAB)
    return torch.randint(low, high, (2, length), generator=torch.Generator().manual_seed(seed))


def bnb_round_trip(table: torch.Tensor, kind: str) -> torch.Tensor:
    """bitsandbytes' own quantise-dequantise of `table` (4-bit through its flat path, with double
    quantisation as mamba-ft's default; int8 row-wise)."""
    bf = bnb.functional
    if kind == "int8":
        return bf.int8_vectorwise_dequant(*bf.int8_vectorwise_quant(table.half())[:2])
    flat = bf.dequantize_4bit(*bf.quantize_4bit(table.flatten(), quant_type=kind, compress_statistics=True))
    return flat.reshape(table.shape)


@pytest.mark.parametrize("hidden", [64, 32])
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_lookup_and_tied_head_equal_the_dequantised_table(kind, hidden):
    model, report, plain = quantized("mamba", kind, hidden)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, QuantizedTiedHead)
    assert head.embedding is emb and report.head == "tied"
    W = dequantized_weight(emb)
    assert W.shape == (VOCAB, hidden) and W.dtype == torch.float32
    # The table is the quantisation of the original one, exactly as bitsandbytes does it.
    torch.testing.assert_close(W, bnb_round_trip(plain.backbone.embeddings.weight.detach(), kind).float(),
                               rtol=0, atol=1e-6)
    ids = token_ids("mamba")
    out = emb(ids)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, F.embedding(ids, W), rtol=0, atol=0)  # the same values
    # The tied head: logits = hidden @ Wᵀ; the hidden states get the gradient g @ W, the
    # table none (it has no float parameter to take one).
    h = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(0), requires_grad=True)
    logits = head(h)
    torch.testing.assert_close(logits, h @ W.T, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(logits)
    logits.backward(g)
    torch.testing.assert_close(h.grad, g @ W, rtol=1e-5, atol=1e-6)
    assert not emb.weight.requires_grad and emb.weight.grad is None
    # `weight`, as transformers' Mamba reads it (the cast) and the chunked loss (the shape):
    # the compute dtype, the table's shape and device, and no values.
    assert head.weight.dtype == torch.float32 and head.weight.shape == (VOCAB, hidden)
    assert head.weight.device == emb.weight.device and torch.isnan(head.weight).all()
    # The whole model: its logits are the head of its hidden states.
    with torch.no_grad():
        hidden_states = model.backbone(ids).last_hidden_state
        torch.testing.assert_close(model(ids).logits, hidden_states @ W.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_rows_lookup_equals_the_whole_table_and_runs_in_the_compute_dtype(kind):
    needs_quantization(kind)
    table = torch.randn(300, 128, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        emb = QuantizedEmbedding.quantize(table.to(dtype), kind, dtype)
        ids = torch.tensor([[0, 299, 5, 5], [17, 1, 298, 0]])
        out = emb(ids)
        assert out.dtype == dtype and out.shape == (2, 4, 128)
        torch.testing.assert_close(out, F.embedding(ids, emb.dequantize()), rtol=0, atol=0)
        assert emb(ids[:, :0]).shape == (2, 0, 128)
    # Under bf16 autocast (compute dtype bf16) the tied head gives the fp32 logits of the same
    # bf16 table to bf16 rounding.
    head = QuantizedTiedHead(emb)
    h = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(h.to(head.weight.dtype))
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), h @ emb.dequantize(torch.float32).T, rtol=2e-2, atol=0.3)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_embedding_writes_and_loads_its_state_dict(kind, tmp_path):
    needs_quantization(kind)
    gen = torch.Generator().manual_seed(0)
    a = QuantizedEmbedding.quantize(torch.randn(200, 64, generator=gen), kind, torch.float32)
    b = QuantizedEmbedding.quantize(torch.randn(200, 64, generator=gen), kind, torch.float32)
    assert not torch.equal(a.dequantize(), b.dequantize())
    state = a.state_dict()
    assert "weight" in state and ("SCB" in state if kind == "int8" else "weight.absmax" in state)
    torch.save(state, tmp_path / "emb.pt")
    b.load_state_dict(torch.load(tmp_path / "emb.pt", weights_only=True))  # strict: nothing left over
    torch.testing.assert_close(b.dequantize(), a.dequantize(), rtol=0, atol=0)
    ids = torch.tensor([3, 199, 0])
    torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)
    other = "int8" if kind != "int8" else "nf4"
    needs_quantization(other)
    c = QuantizedEmbedding.quantize(torch.randn(200, 64, generator=gen), other, torch.float32)
    with pytest.raises(RuntimeError):
        c.load_state_dict(state)
    # A whole quantised model writes its state dict too (bitsandbytes' Embedding4bit raises).
    model, _, _ = quantized("mamba", kind)
    keys = model.state_dict().keys()
    assert "backbone.embeddings.weight" in keys and not any(k.startswith("lm_head") for k in keys)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_with_quantised_embeddings_equals_its_dequantised_twin(family, kind):
    """Logits and every adapter gradient (embeddings and lm_head adapters included) equal those
    of the same model with plain modules holding the dequantised weights; every adapter gets a
    non-zero gradient, the base (the table included) none."""
    model, _, _ = quantized(family, kind)
    attach_adapters(model, AdapterConfig(targets=EVERYTHING, rank=3))
    randomize_adapters(model)
    twin = copy.deepcopy(model)
    # in_proj and out_proj of both layers, and the embedding (the tied head holds nothing); the
    # embedding and head adapters move onto the plain modules, as merge_adapters moves them.
    assert dequantize_keeping_adapters(twin) == 5
    assert type(twin.get_input_embeddings()) is nn.Embedding
    assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight
    ids = token_ids(family)
    out = model(ids, labels=ids)
    ref = twin(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    ours = assert_adapter_grads_match_twin(model, twin, rtol=1e-4)
    assert any("embeddings.adapter" in n for n in ours) and any("lm_head.adapter" in n for n in ours)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in ours)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_a_tiny_model_with_quantised_embeddings_trains(family):
    model, _, _ = quantized(family, "nf4")
    attach_adapters(model, AdapterConfig(targets=EVERYTHING, rank=4))
    params = list(adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = token_ids(family, length=24)
    table = model.get_input_embeddings().weight.detach().clone()
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert torch.equal(model.get_input_embeddings().weight, table)  # the table never moves


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_cached_decoding_with_quantised_embeddings_equals_the_full_forward(kind):
    for family in ("mamba", "mamba2"):
        model, _, _ = quantized(family, kind)
        attach_adapters(model, AdapterConfig(targets=EVERYTHING, rank=3))
        randomize_adapters(model)
        model.eval()
        ids = token_ids(family)
        with torch.no_grad():
            full = model(ids).logits
            if family == "mamba":
                out = model(ids[:, :6], use_cache=True)
                parts = [out.logits]
                for t in range(6, ids.shape[1]):
                    out = model(ids[:, t:t + 1], **{CACHE1: getattr(out, CACHE1)}, use_cache=True)
                    parts.append(out.logits)
            else:
                cache = DynamicCache(config=model.config)
                parts = [model(ids[:, :6], **{CACHE2: cache}, use_cache=True).logits,
                         model(ids[:, 6:17], **{CACHE2: cache}, use_cache=True).logits]
                parts += [model(ids[:, t:t + 1], **{CACHE2: cache}, use_cache=True).logits
                          for t in range(17, ids.shape[1])]
        # The same dequantised rows and table on every path; a recurrence instead of the scan.
        torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5, msg=family)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_saved_adapter_reloads_onto_a_fresh_base_and_merges_to_plain_transformers(family, kind, tmp_path):
    needs_quantization(kind)
    base_dir = tmp_path / "base"
    plain = plain_mamba(3, hidden_size=64) if family == "mamba" else plain_mamba2(3, hidden_size=64, tie=True)
    plain.save_pretrained(base_dir)
    config = QuantizeConfig(kind=kind, modules=WITH_EMBEDDINGS)
    model = load_model(base_dir, need_tokenizer=False, quantize=config).model
    attach_adapters(model, AdapterConfig(targets=EVERYTHING, rank=3))
    randomize_adapters(model, std=0.05)
    ids = token_ids(family)
    with torch.no_grad():
        qlora_logits = model(ids).logits
    save_adapters(model, tmp_path / "adapter", base_model=str(base_dir))

    # A freshly quantised base gives the same table, and the adapters load onto it.
    fresh = load_model(base_dir, need_tokenizer=False, quantize=config).model
    load_adapters(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, qlora_logits, rtol=0, atol=0)
    merge_adapters(fresh)
    assert not any(is_quantized(m) or isinstance(m, QuantizedTiedHead) for m in fresh.modules())
    fresh.save_pretrained(tmp_path / "merged")
    cls = MambaForCausalLM if family == "mamba" else Mamba2ForCausalLM
    merged = cls.from_pretrained(tmp_path / "merged")
    assert type(merged.backbone.layers[0].mixer).__module__.startswith("transformers")
    # Both embeddings and head were adapted: the merge unties them.
    assert merged.lm_head.weight is not merged.backbone.embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, qlora_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_base_weight_bytes_drop_by_the_table_less_its_quantised_storage(kind):
    needs_quantization(kind)
    without = ft_copy(plain_mamba(0, hidden_size=64))
    quantize_model(without, QuantizeConfig(kind=kind))
    model, report, _ = quantized("mamba", kind)
    count, params, before, after = report.rows["embeddings"]
    assert (count, params, before) == (1, VOCAB * 64, VOCAB * 64 * 4)
    emb = model.get_input_embeddings()
    if kind == "int8":  # a byte a weight and an fp32 scale a row
        assert after == VOCAB * 64 + VOCAB * 4
    else:  # two weights a byte, a byte of scale per 64 (double quantisation), small code books
        assert VOCAB * 32 + VOCAB < after < VOCAB * 32 + VOCAB + 2 * 1024 + 64
        assert emb.weight.numel() * emb.weight.element_size() == VOCAB * 32
    # The tied table was counted once before (one Parameter for embeddings and head) and its
    # quantised storage once after; nothing else changed.
    assert base_weight_bytes(without) - base_weight_bytes(model) == before - after
    assert report.base_bytes == base_weight_bytes(model)
    text = report.format()
    assert text.splitlines()[4].startswith("embeddings")
    assert "kept in float32: x_proj, dt_proj, conv1d, A_log, D, norms\n" in text
    assert f"lm_head: tied to the embeddings, reads their {kind} table" in text
    # The adapter report counts the table by its elements, as on an unquantised base.
    adapters = attach_adapters(model, AdapterConfig(targets=["in_proj"], rank=2))
    unquantised = attach_adapters(ft_copy(plain_mamba(0, hidden_size=64)),
                                  AdapterConfig(targets=["in_proj"], rank=2))
    assert adapters.base_parameters == unquantised.base_parameters


def test_an_untied_head_stays_in_the_compute_dtype():
    model, report, plain = quantized("mamba2", "nf4", tie=False)
    assert report.head == "untied"
    assert "kept in float32: conv1d, A_log, D, dt_bias, norms, lm_head (untied)" in report.format()
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    torch.testing.assert_close(head.weight, plain.lm_head.weight, rtol=0, atol=0)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    twin = copy.deepcopy(model)
    dequantize_model(twin)
    ids = token_ids("mamba2")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=1e-5, atol=1e-5)


def test_chunked_head_loss_reads_the_quantised_table(monkeypatch):
    from accelerate import Accelerator

    from mamba_ft.data import IGNORE
    from mamba_ft.training import loss as loss_mod
    from mamba_ft.training.step import forward_loss_sum

    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", VOCAB * 7)  # 7 rows a chunk: several chunks
    model, _, _ = quantized("mamba", "nf4")
    attach_adapters(model, AdapterConfig(targets=EVERYTHING, rank=2))
    randomize_adapters(model)
    ids = token_ids("mamba", length=19)
    labels = ids.clone()
    labels[0, :5] = IGNORE
    head = model.get_output_embeddings()
    results = []
    for chunked in (False, True):
        model.zero_grad()
        loss = forward_loss_sum(model, {"input_ids": ids, "labels": labels}, Accelerator(cpu=True),
                                backward_scale=1.0, chunked_head=chunked)
        results.append((loss.item(), {n: p.grad.clone() for n, p in adapter_parameters(model).items()}))
    assert model.get_output_embeddings() is head
    (full_loss, full_grads), (chunked_loss, chunked_grads) = results
    assert chunked_loss == pytest.approx(full_loss, rel=1e-6)
    for name, g in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-5,
                                   atol=1e-6 * g.abs().max().item() + 1e-9, msg=name)


def test_embeddings_that_cannot_be_quantised_are_refused_and_nothing_changes():
    needs_quantization("nf4")

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = ft_copy(plain_mamba(0))
    model.set_input_embeddings(Scaled(VOCAB, 32))
    with pytest.raises(UserError, match="input embedding is Scaled, which mamba-ft cannot quantise"):
        quantize_model(model, QuantizeConfig(kind="nf4", modules=WITH_EMBEDDINGS))
    assert not any(is_quantized(m) for m in model.modules())  # nothing half-done
    # Only the embeddings: a valid choice (the projections stay as they are).
    model = ft_copy(plain_mamba(0))
    report = quantize_model(model, QuantizeConfig(kind="nf4", modules=["embeddings"]))
    assert list(report.rows) == ["embeddings"] and not is_quantized(model.backbone.layers[0].mixer.in_proj)
    with pytest.raises(UserError, match="already quantised"):
        quantize_model(model, QuantizeConfig(kind="nf4", modules=["in_proj"]))


def test_quickstart_recipe_trains_with_quantised_embeddings_and_the_chunked_head(tmp_path):
    # About 5 s on a 2-core CPU: the recipe path end to end (load, quantise, attach with an
    # embeddings adapter, the chunked head loss over the tied quantised head, save, merge).
    needs_quantization("nf4")
    import json
    from pathlib import Path

    from mamba_ft.training import loop

    recipe = Path(__file__).resolve().parents[2] / "recipes/quickstart.yaml"
    result = loop.train_from_recipe(str(recipe), [
        f"run.output_dir={tmp_path / 'run'}", "run.max_steps=6", "run.save_every=0",
        "run.eval_batches=2", "logging.progress_bar=false", "logging.plot=false",
        "model.quantize={kind: nf4, modules: [in_proj, out_proj, embeddings]}",
        "adapter.targets=[all, embeddings]", "run.chunked_head_loss=true", "run.merge_at_end=true"])
    assert result.final_eval_loss < 0.7 * result.initial_eval_loss
    meta = json.loads((tmp_path / "run" / "adapter" / "mamba_ft_adapter.json").read_text())
    assert meta["base_quantization"]["modules"] == ["in_proj", "out_proj", "embeddings"]
    merged = MambaForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    assert merged.backbone.embeddings.weight.dtype == torch.float32
