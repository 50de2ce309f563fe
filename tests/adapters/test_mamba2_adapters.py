"""Adapters on every buffer of the Mamba-2 mixer: gradients, the guard, merge, save / load,
`mamba-ft merge`, what plain PEFT can load, cached decoding and packed rows.

References: transformers' own `Mamba2ForCausalLM` holding the merged weights (its PyTorch
path), fully trainable, for the gradients (chain rule: dL/dA = s·Bᵀ·G, dL/dB = s·G·Aᵀ with
G = dL/dW_eff; an additive delta gets G itself) and for merged checkpoints (1e-5 at fp32:
transformers' SSD and mamba-ft's reference sum in different orders); the adapter model's own
logits for save -> load (bitwise: the same tensors through the same ops).
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from pydantic import ValidationError
from transformers import DynamicCache, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from adapter_models import (MAMBA2_VOCAB, assert_guard_names_layer_0, assert_merged_rows, ft_copy,
                            plain_mamba2, randomize_adapters)
from mamba_ft.adapters import (
    MAMBA2,
    AdapterConfig,
    adapter_parameters,
    attach_adapters,
    attached,
    check_adapter_gradients,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from mamba_ft.errors import UserError
from mamba_ft.models import document_starts, mixers

# Touches transformers / PEFT internals: .ci/run re-runs it on the lowest supported versions.
pytestmark = pytest.mark.seam

CACHE = "cache" if "cache" in inspect.signature(Mamba2ForCausalLM.forward).parameters else "cache_params"
VOCAB = MAMBA2_VOCAB
EVERYTHING = ["all", "embeddings", "lm_head"]
BLOCKS = ["in_proj.z", "in_proj.x", "in_proj.B", "in_proj.C", "in_proj.dt"]


def adapted(targets, seed=0, tie=False, hidden_size=32, **kw):
    model = ft_copy(plain_mamba2(seed, tie=tie, hidden_size=hidden_size))
    attach_adapters(model, AdapterConfig(targets=targets, rank=3, **kw))
    randomize_adapters(model)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids() -> torch.Tensor:
    # 21 positions: not a multiple of the chunk (8).
    return torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item() + 1e-9)


TARGET_SETS = [[t] for t in MAMBA2.targets] + [EVERYTHING, BLOCKS, ["in_proj.x", "in_proj.dt", "out_proj"]]


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["+".join(t) for t in TARGET_SETS])
def test_every_target_gets_the_full_finetune_gradient(targets, ids):
    model = ft_copy(plain_mamba2())
    attach_adapters(model, AdapterConfig(targets=targets, rank=3, alpha=6.0,
                                         rank_per_target={"in_proj.dt": 2} if "in_proj.dt" in targets else {}))
    randomize_adapters(model)
    out = model(ids, labels=ids)
    out.loss.backward()
    check_adapter_gradients(model)
    params = adapter_parameters(model)
    assert params
    for name, p in params.items():
        assert p.dtype == torch.float32
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"

    merged = merge_adapters(copy.deepcopy(model))
    ref = Mamba2ForCausalLM(merged.config)
    ref.load_state_dict(merged.state_dict())
    ref.train()
    ref_out = ref(ids, labels=ids)
    ref_out.loss.backward()
    close(out.loss.detach(), ref_out.loss.detach())
    G = {n: p.grad for n, p in ref.named_parameters()}

    checked = set()
    for mixer in (m for m in mixers(model) if m.adapter is not None):
        prefix = f"backbone.layers.{mixer.layer_idx}.mixer."
        G_in = G[prefix + "in_proj.weight"]
        grads = {"in_proj": G_in, "out_proj": G[prefix + "out_proj.weight"],
                 "conv1d": G[prefix + "conv1d.weight"][:, 0, :]}
        for block, (lo, hi) in mixer.adapter.in_proj_rows.items():
            grads[block.replace(".", "_")] = G_in[lo:hi]
        for key, lr in mixer.adapter.low_rank.items():
            A, B = lr.lora_A.detach(), lr.lora_B.detach()
            close(lr.lora_A.grad, lr.scale * B.T @ grads[key])
            close(lr.lora_B.grad, lr.scale * grads[key] @ A.T)
            checked.update({id(lr.lora_A), id(lr.lora_B)})
        deltas = {"norm": G[prefix + "norm.weight"], "A_log": G[prefix + "A_log"],
                  "D": G[prefix + "D"], "dt_bias": G[prefix + "dt_bias"]}
        for key, delta in mixer.adapter.delta.items():
            close(delta.grad, deltas[key])
            checked.add(id(delta))
    emb = model.get_input_embeddings()
    if getattr(emb, "adapter", None) is not None:
        a, GE = emb.adapter, G["backbone.embeddings.weight"]
        close(a.lora_embedding_A.grad, a.scale * a.lora_embedding_B.detach().T @ GE.T)
        close(a.lora_embedding_B.grad, a.scale * GE.T @ a.lora_embedding_A.detach().T)
        checked.update({id(a.lora_embedding_A), id(a.lora_embedding_B)})
    head = model.get_output_embeddings()
    if getattr(head, "adapter", None) is not None:
        a, GH = head.adapter, G["lm_head.weight"]
        close(a.lora_A.grad, a.scale * a.lora_B.detach().T @ GH)
        close(a.lora_B.grad, a.scale * GH @ a.lora_A.detach().T)
        checked.update({id(a.lora_A), id(a.lora_B)})
    assert checked == {id(p) for p in params.values()}


@pytest.mark.parametrize("block,rows", [("in_proj.z", (0, 64)), ("in_proj.x", (64, 128)),
                                        ("in_proj.B", (128, 144)), ("in_proj.C", (144, 160)),
                                        ("in_proj.dt", (160, 168))])
def test_in_proj_block_changes_only_its_rows(block, rows):
    model = adapted([block])
    merge_adapters(model)
    assert_merged_rows(plain_mamba2(), model, "in_proj", 168, rows)


def test_guard_names_adapters_the_forward_never_reads(ids):
    # Per layer: in_proj, conv1d, out_proj (A and B each) + norm, A_log, D, dt_bias = 10.
    assert_guard_names_layer_0(ft_copy(plain_mamba2()), ids, dead=10, total=20)


def test_targets_aliases_and_errors_are_mamba2s():
    model = ft_copy(plain_mamba2())
    report = attach_adapters(model, AdapterConfig(targets=["all_linear"], rank=4))
    assert [r.target for r in report.rows] == ["in_proj", "out_proj"]
    model = ft_copy(plain_mamba2())
    report = attach_adapters(model, AdapterConfig(targets=["all"], rank=4, layers=[1],
                                                  rank_per_target={"conv1d": 2}))
    rows = {r.target: (r.modules, r.parameters) for r in report.rows}
    # in_proj (168 x 32), conv1d (96 x 4) at rank 2, out_proj (32 x 64); vectors of d_inner / heads.
    assert rows == {"in_proj": (1, 4 * 32 + 168 * 4), "conv1d": (1, 2 * 4 + 96 * 2),
                    "out_proj": (1, 4 * 64 + 32 * 4), "norm": (1, 64), "A_log": (1, 8),
                    "D": (1, 8), "dt_bias": (1, 8)}
    assert mixers(model)[0].adapter is None
    assert report.trainable == sum(p.numel() for p in adapter_parameters(model).values())

    # A Mamba-1 name on a Mamba-2 model: the valid names of this family, with a did-you-mean.
    with pytest.raises(UserError) as err:
        attach_adapters(ft_copy(plain_mamba2()), AdapterConfig(targets=["in_proj", "x_proj"]))
    text = str(err.value)
    assert "Unknown adapter target 'x_proj' for a Mamba-2 model" in text
    for name in ("in_proj.z", "in_proj.dt", "conv1d", "norm", "dt_bias", "all_linear"):
        assert name in text
    assert "dt_proj" not in text and "x_proj.dt" not in text
    with pytest.raises(UserError, match="Did you mean 'out_proj'"):
        attach_adapters(ft_copy(plain_mamba2()), AdapterConfig(targets=["in_proj", "outproj"]))
    # A rank for a target Mamba-2's `all` does not hold (Mamba-1's does, so the config passes).
    with pytest.raises(UserError, match="rank_per_target names 'x_proj'"):
        attach_adapters(ft_copy(plain_mamba2()), AdapterConfig(targets=["all"], rank_per_target={"x_proj": 2}))
    # Checked without a model: a typo beside a Mamba-only name, whole + block, a rank for a vector.
    with pytest.raises(ValidationError, match="Did you mean 'norm'"):
        AdapterConfig(targets=["conv1d", "nrom"])
    with pytest.raises(ValidationError, match="in_proj \\(whole\\) and its row block 'in_proj.B'"):
        AdapterConfig(targets=["all", "in_proj.B"])
    with pytest.raises(ValidationError, match="without a rank"):
        AdapterConfig(targets=["norm"], rank_per_target={"norm": 2})
    # transformers' own Mamba2Mixer reads raw weights in its fused path: swap first.
    with pytest.raises(UserError, match="swap_mixers"):
        attach_adapters(plain_mamba2(), AdapterConfig(targets=["in_proj"]))


@pytest.mark.parametrize("tie", [False, True])
def test_merge_gives_plain_transformers_mamba2(tmp_path, ids, tie):
    model = adapted(EVERYTHING, tie=tie)
    expected = logits(model, ids)
    merge_adapters(model)
    assert attached(model) is None and not adapter_parameters(model)
    model.save_pretrained(tmp_path / "merged")
    plain = Mamba2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(plain.backbone.layers[0].mixer) is Mamba2Mixer
    if tie:  # embeddings and head adapted separately: untied in the merged checkpoint
        assert plain.lm_head.weight.data_ptr() != plain.backbone.embeddings.weight.data_ptr()
    torch.testing.assert_close(logits(plain, ids), expected, rtol=0, atol=1e-5)
    assert (expected - logits(plain_mamba2(tie=tie), ids)).abs().max() > 1e-3  # adapters in use


def test_save_load_round_trip_gives_identical_logits(tmp_path, ids):
    model = adapted(EVERYTHING, rank_per_target={"conv1d": 2, "embeddings": 5}, dropout=0.1)
    save_adapters(model, tmp_path / "ad", base_model="base")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "mamba_ft_adapter.json",
        "mamba_ft_adapter.safetensors"]
    meta = json.loads((tmp_path / "ad" / "mamba_ft_adapter.json").read_text())
    assert meta["model_type"] == "mamba2"
    assert meta["peft_targets"] == ["embeddings", "in_proj", "lm_head"]
    assert meta["mamba_ft_only_targets"] == ["A_log", "D", "conv1d", "dt_bias", "norm", "out_proj"]
    fresh = ft_copy(plain_mamba2())
    load_adapters(fresh, tmp_path / "ad")
    fresh.eval()
    assert attached(fresh).config == attached(model).config
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(adapter_parameters(fresh))

    # Blocks go to mamba-ft's file (PEFT has no row blocks); a Mamba-1 model refuses the adapter.
    blocks = adapted(BLOCKS)
    save_adapters(blocks, tmp_path / "blocks", base_model="base")
    again = ft_copy(plain_mamba2())
    load_adapters(again, tmp_path / "blocks")
    assert torch.equal(logits(again.eval(), ids), logits(blocks, ids))
    from adapter_models import ft_copy as ft_mamba1, plain_mamba

    with pytest.raises(UserError, match="made for a 'mamba2' model"):
        load_adapters(ft_mamba1(plain_mamba()), tmp_path / "ad")
    wide = ft_copy(plain_mamba2(hidden_size=64))
    with pytest.raises(UserError, match="does not fit this model"):
        load_adapters(wide, tmp_path / "ad")
    assert attached(wide) is None


def test_merge_command_writes_plain_mamba2_checkpoint(tmp_path, ids, capsys, word_tokenizer_factory):
    from transformers import AutoTokenizer

    from mamba_ft.cli import main

    plain_mamba2().save_pretrained(tmp_path / "base")
    word_tokenizer_factory(tmp_path / "base")
    model = adapted(EVERYTHING)
    save_adapters(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert "merged model written to" in capsys.readouterr().out
    merged = Mamba2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged.backbone.layers[0].mixer) is Mamba2Mixer
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("w0 w1")["input_ids"] == [3, 4]


def test_peft_loads_in_proj_embeddings_and_head_and_nothing_else(tmp_path, ids):
    """The truth of peft (installed version) on transformers' Mamba2ForCausalLM: in_proj,
    the embeddings and the head load and give mamba-ft's logits; out_proj and conv1d are
    refused for model_type mamba2, the norms are not a layer type PEFT wraps, and PEFT's
    target_parameters takes no 1-D parameter (norm.weight, A_log, D, dt_bias are all 1-D)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = adapted(["in_proj", "embeddings", "lm_head"], rank_per_target={"in_proj": 2}, layers=[1])
    save_adapters(model, tmp_path / "ad", base_model="x")
    assert not (tmp_path / "ad" / "mamba_ft_adapter.safetensors").exists()
    peft_model = PeftModel.from_pretrained(plain_mamba2(), tmp_path / "ad").eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=0, atol=1e-5)

    # With every target, PEFT applies its part (in_proj, embeddings, lm_head) and nothing else.
    full = adapted(EVERYTHING)
    save_adapters(full, tmp_path / "full", base_model="x")
    peft_model = PeftModel.from_pretrained(plain_mamba2(), tmp_path / "full").eval()
    peft_part = ft_copy(plain_mamba2())
    attach_adapters(peft_part, AdapterConfig(targets=["in_proj", "embeddings", "lm_head"], rank=3))
    peft_part.load_state_dict({k: v for k, v in full.state_dict().items()
                               if ".adapter.delta." not in k and "low_rank.conv1d" not in k
                               and "low_rank.out_proj" not in k})
    torch.testing.assert_close(logits(peft_model, ids), logits(peft_part.eval(), ids), rtol=0, atol=1e-5)
    assert (logits(peft_part, ids) - logits(full, ids)).abs().max() > 1e-3

    for target in ("out_proj", "conv1d"):
        with pytest.raises(ValueError, match="incompatible with Mamba-based models \\(model_type='mamba2'\\)"):
            get_peft_model(plain_mamba2(), LoraConfig(r=2, target_modules=[target]))
    for target in ("norm", "mixer.norm"):
        with pytest.raises(ValueError, match="is not supported"):
            get_peft_model(plain_mamba2(), LoraConfig(r=2, target_modules=[target]))
    # PEFT refuses 1-D parameters as targets: peft 0.21 with a ValueError naming them, peft 0.18
    # (the lowest version mamba-ft supports) by failing inside its LoRA layer (IndexError).
    for parameter in ("A_log", "D", "dt_bias", "norm.weight"):
        with pytest.raises((ValueError, IndexError)):
            get_peft_model(plain_mamba2(), LoraConfig(r=2, target_modules=[], target_parameters=[parameter]))


def test_cached_decoding_with_adapters_equals_the_full_forward():
    model = adapted(EVERYTHING)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        # Prefill 6 (inside a chunk), chunked prefill to 17 (across chunks), one-token steps.
        parts = [model(ids[:, :6], **{CACHE: cache}, use_cache=True).logits,
                 model(ids[:, 6:17], **{CACHE: cache}, use_cache=True).logits]
        parts += [model(ids[:, t:t + 1], **{CACHE: cache}, use_cache=True).logits for t in range(17, 20)]
        generated = model.generate(ids[:, :6], max_new_tokens=4, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    greedy = generated.sequences
    with torch.no_grad():
        again = model(greedy).logits
    for step, step_logits in enumerate(generated.logits):
        torch.testing.assert_close(step_logits, again[:, 5 + step], rtol=0, atol=1e-5)
    assert (full - logits(plain_mamba2(), ids)).abs().max() > 1e-3


def test_packed_row_with_adapters_equals_documents_apart():
    """Outputs, loss and the gradient of every adapter parameter (the base is frozen)."""
    model = adapted(EVERYTHING, seed=0)
    model.train()  # no dropout configured: train mode changes nothing but is the real case
    apart = copy.deepcopy(model)
    docs = [torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 11, 7)]
    packed = torch.cat(docs, dim=1)
    starts = torch.zeros_like(packed, dtype=torch.bool)
    starts[0, [0, 5, 16]] = True
    ce = torch.nn.functional.cross_entropy
    with document_starts(model, starts):
        packed_logits = model(packed).logits
        loss = sum(ce(packed_logits[0, a:b - 1], packed[0, a + 1:b], reduction="sum")
                   for a, b in ((0, 5), (5, 16), (16, 23)))
        loss.backward()
    separate = [apart(doc).logits for doc in docs]
    loss_apart = sum(ce(lg[0, :-1], doc[0, 1:], reduction="sum") for lg, doc in zip(separate, docs))
    loss_apart.backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_logits, torch.cat(separate, dim=1), **tol)
    torch.testing.assert_close(loss, loss_apart, **tol)
    got, want = adapter_parameters(model), adapter_parameters(apart)
    assert got.keys() == want.keys() and len(got) == 2 * 10 + 4
    for name in got:
        assert got[name].grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name].grad, want[name].grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
