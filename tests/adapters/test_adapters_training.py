"""Adapters on a tiny Mamba: gradients, one training step, the guard, decoding, bf16.

The gradient reference is independent of mamba-ft's forward: transformers' own MambaForCausalLM
holding the merged weights, fully trainable. For W_eff = W + s·B·A the chain rule gives
dL/dA = s·Bᵀ·G and dL/dB = s·G·Aᵀ with G = dL/dW_eff from that model; an additive delta gets G
itself. Tolerance: rtol 1e-4 plus 1e-5 of the largest entry, because transformers' sequential
scan and mamba-ft's chunked scan sum in different orders (fp32 rounding, ~1e-7 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_models import (assert_guard_names_layer_0, assert_merged_rows, ft_copy, plain_mamba,
                            randomize_adapters)
from transformers import MambaForCausalLM

from mamba_ft.adapters import (
    MAMBA_TARGETS,
    AdapterConfig,
    adapter_parameters,
    attach_adapters,
    check_adapter_gradients,
    merge_adapters,
)
from mamba_ft.errors import UserError
from mamba_ft.models import mixers

TARGET_SETS = [[t] for t in MAMBA_TARGETS] + [
    ["all", "embeddings", "lm_head"],
    ["x_proj.dt", "x_proj.B", "x_proj.C", "in_proj"],
]


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item() + 1e-9)


def expected_low_rank_grads(A, B, scale, G):
    return scale * B.T @ G, scale * G @ A.T


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["+".join(t) for t in TARGET_SETS])
def test_gradients_match_full_finetune_reference_and_step_changes_logits(targets, ids):
    base = plain_mamba()
    model = ft_copy(base)
    attach_adapters(model, AdapterConfig(targets=targets, rank=3, alpha=6.0))
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
    ref = MambaForCausalLM(merged.config)
    ref.load_state_dict(merged.state_dict())
    ref.train()
    ref_out = ref(ids, labels=ids)
    ref_out.loss.backward()
    close(out.loss.detach(), ref_out.loss.detach())
    G = {n: p.grad for n, p in ref.named_parameters()}

    checked = set()
    for mixer in (m for m in mixers(model) if m.adapter is not None):
        prefix = f"backbone.layers.{mixer.layer_idx}.mixer."
        R, N = mixer.time_step_rank, mixer.ssm_state_size
        # The matrix each low-rank adapter changes, and the rows of x_proj each block owns
        # (transformers splits x_proj's output as [dt | B | C]).
        grads = {
            "in_proj": G[prefix + "in_proj.weight"], "out_proj": G[prefix + "out_proj.weight"],
            "dt_proj": G[prefix + "dt_proj.weight"], "conv1d": G[prefix + "conv1d.weight"][:, 0, :],
            "x_proj": G[prefix + "x_proj.weight"], "x_proj_dt": G[prefix + "x_proj.weight"][:R],
            "x_proj_B": G[prefix + "x_proj.weight"][R:R + N], "x_proj_C": G[prefix + "x_proj.weight"][R + N:],
        }
        for key, lr in mixer.adapter.low_rank.items():
            gA, gB = expected_low_rank_grads(lr.lora_A.detach(), lr.lora_B.detach(), lr.scale, grads[key])
            close(lr.lora_A.grad, gA)
            close(lr.lora_B.grad, gB)
            checked.update({id(lr.lora_A), id(lr.lora_B)})
        ssm_grads = {"A_log": G[prefix + "A_log"], "D": G[prefix + "D"], "dt_bias": G[prefix + "dt_proj.bias"]}
        for key, delta in mixer.adapter.ssm.items():
            close(delta.grad, ssm_grads[key])
            checked.add(id(delta))
    emb = model.get_input_embeddings()
    if getattr(emb, "adapter", None) is not None:
        a = emb.adapter  # delta (vocab, dim) = s·(B·A)ᵀ = s·Aᵀ·Bᵀ
        GE = G["backbone.embeddings.weight"]
        close(a.lora_embedding_A.grad, a.scale * a.lora_embedding_B.detach().T @ GE.T)
        close(a.lora_embedding_B.grad, a.scale * GE.T @ a.lora_embedding_A.detach().T)
        checked.update({id(a.lora_embedding_A), id(a.lora_embedding_B)})
    head = model.get_output_embeddings()
    if getattr(head, "adapter", None) is not None:
        a = head.adapter
        gA, gB = expected_low_rank_grads(a.lora_A.detach(), a.lora_B.detach(), a.scale, G["lm_head.weight"])
        close(a.lora_A.grad, gA)
        close(a.lora_B.grad, gB)
        checked.update({id(a.lora_A), id(a.lora_B)})
    assert checked == {id(p) for p in params.values()}

    # One optimizer step on the adapters changes the logits and leaves the base untouched.
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in params}
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    # Adam: the first step moves every entry by about lr, whatever the gradient's scale.
    torch.optim.Adam(params.values(), lr=0.1).step()
    with torch.no_grad():
        after = model(ids).logits
    # The eval forward is deterministic (unchanged weights give bitwise equal logits), so any
    # change above fp32 noise is the step's; dt's effect is small in a random tiny model.
    assert (after - before).abs().max() > 1e-5
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"base parameter {n} changed"


@pytest.mark.parametrize("block,rows", [("x_proj.dt", (0, 2)), ("x_proj.B", (2, 10)), ("x_proj.C", (10, 18))])
def test_x_proj_block_changes_only_its_rows(block, rows):
    base = plain_mamba()
    model = ft_copy(base)
    attach_adapters(model, AdapterConfig(targets=[block], rank=2))
    randomize_adapters(model)
    merge_adapters(model)
    assert_merged_rows(base, model, "x_proj", 18, rows)


def test_guard_names_adapters_the_forward_never_reads(ids):
    assert_guard_names_layer_0(ft_copy(plain_mamba()), ids, dead=13, total=26)


def test_plain_transformers_peft_dt_proj_lora_gets_no_gradient(ids):
    """The failure mamba-ft exists to fix. If this test fails, a transformers/peft release now
    applies dt_proj LoRA: update docs/adapters.md (targets table) and this test."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(plain_mamba(), LoraConfig(r=4, target_modules=["dt_proj"], init_lora_weights=False))
    model.train()
    loss = model(ids, labels=ids).loss
    assert not loss.requires_grad  # no LoRA parameter is in the graph at all
    # Make one base weight trainable so a backward can run, then look at the LoRA gradients.
    model.get_input_embeddings().weight.requires_grad_(True)
    model(ids, labels=ids).loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 4  # A and B in 2 layers
    assert all(p.grad is None for p in lora.values())
    with pytest.raises(UserError, match="4 of 4 adapter parameters received no gradient"):
        check_adapter_gradients(model)
    # And PEFT refuses out_proj / conv1d on Mamba models outright.
    for target in ("out_proj", "conv1d"):
        with pytest.raises(ValueError, match="incompatible with Mamba"):
            get_peft_model(plain_mamba(), LoraConfig(r=4, target_modules=[target]))


@pytest.mark.seam
def test_decoding_with_cache_equals_full_forward(ids):
    model = ft_copy(plain_mamba())
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
    # Same ops, a recurrence instead of a chunked scan: fp32 rounding only.
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    with torch.no_grad():  # the adapters are really in use
        assert (full - ft_copy(plain_mamba())(ids).logits).abs().max() > 1e-3


def test_bf16_model_keeps_fp32_adapters_with_finite_gradients(ids):
    model = ft_copy(plain_mamba()).to(torch.bfloat16)
    attach_adapters(model, AdapterConfig(targets=["all", "embeddings", "lm_head"], rank=2))
    randomize_adapters(model)
    loss = model(ids, labels=ids).loss
    loss.backward()
    check_adapter_gradients(model)
    for name, p in adapter_parameters(model).items():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # The bf16 model computes what the fp32 model with the same weights computes, to bf16 precision.
    ref = ft_copy(plain_mamba())
    attach_adapters(ref, AdapterConfig(targets=["all", "embeddings", "lm_head"], rank=2))
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert abs(ref(ids, labels=ids).loss.item() - loss.item()) < 0.05 * loss.item()


def test_layers_and_report(ids):
    model = ft_copy(plain_mamba())
    base_count = sum(p.numel() for p in model.parameters())
    report = attach_adapters(model, AdapterConfig(targets=["in_proj", "A_log", "embeddings"], rank=4,
                                                  rank_per_target={"in_proj": 2}, layers=[1]))
    first, second = mixers(model)
    assert first.adapter is None and second.adapter is not None
    rows = {r.target: r for r in report.rows}
    # in_proj of one layer: A (2, 32) + B (128, 2); A_log delta (64, 8); embeddings A (4, 64) + B (32, 4).
    assert (rows["in_proj"].modules, rows["in_proj"].parameters) == (1, 2 * 32 + 128 * 2)
    assert (rows["A_log"].modules, rows["A_log"].parameters) == (1, 64 * 8)
    assert (rows["embeddings"].modules, rows["embeddings"].parameters) == (1, 4 * 64 + 32 * 4)
    assert report.trainable == sum(p.numel() for p in adapter_parameters(model).values())
    assert report.base_parameters == base_count
    text = report.format()
    for target in ("in_proj", "A_log", "embeddings", "total", "share of base"):
        assert target in text
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))

    with pytest.raises(UserError, match="has 2 layers"):
        attach_adapters(ft_copy(plain_mamba()), AdapterConfig(targets=["D"], layers=[2]))
    with pytest.raises(UserError, match="already has adapters"):
        attach_adapters(model, AdapterConfig(targets=["D"]))
