"""The chunked next-token loss against F.cross_entropy on the fp32 copy of the shifted logits.

fp32 logits: the same fp32 operations summed in another order, so the loss agrees to 1e-6
relative and the gradient to 1e-6. bf16 logits: both upcast the same bf16 values and the
gradient ends in bf16 either way (autograd casts the fp32 gradient back through `.float()`),
so they agree within one bf16 rounding (rtol 1e-2, atol 1e-6 for the near-zero entries).
"""

import pytest
import torch
import torch.nn.functional as F

import mamba_ft.training.loss as loss_mod

IGNORE = -100


def reference(logits, labels):
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def _case(batch, L, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, L, vocab, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, L), generator=g)
    labels[torch.rand(batch, L, generator=g) < 0.3] = IGNORE  # prompts and padding
    labels[0] = IGNORE  # a row with no target at all
    return logits, labels


@pytest.mark.parametrize("dtype,tol", [
    (torch.float32, dict(rtol=1e-6, atol=1e-6)),
    (torch.bfloat16, dict(rtol=1e-2, atol=1e-6)),
])
@pytest.mark.parametrize("chunk_elements", [loss_mod._CHUNK_ELEMENTS, 7 * 33])  # one / many chunks
def test_loss_and_gradient_match_cross_entropy(dtype, tol, chunk_elements, monkeypatch):
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", chunk_elements)  # 7 rows of 33 per chunk
    logits, labels = _case(3, 17, 33, dtype)
    got = loss_mod.next_token_loss_sum(logits, labels, IGNORE)
    want = reference(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (g_got,) = torch.autograd.grad(got * 0.7, logits)
    (g_want,) = torch.autograd.grad(want * 0.7, logits)
    assert g_got.dtype == dtype
    torch.testing.assert_close(g_got.float(), g_want.float(), **tol)
    assert g_got[0].abs().max() == 0  # no target in row 0: no gradient
    assert g_got[:, -1].abs().max() == 0  # the last position predicts nothing


def test_all_ignored_batch_gives_zero_loss_and_gradient():
    logits, labels = _case(2, 5, 11, torch.float32)
    labels[:] = IGNORE
    loss = loss_mod.next_token_loss_sum(logits, labels, IGNORE)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, logits)
    assert g.abs().max() == 0


# Tiny configs of every type `run.chunked_head_loss` serves (vocab 96; hybrids with attention).
_HEAD_CONFIGS = {
    "mamba": dict(hidden_size=16, state_size=4, num_hidden_layers=2, expand=2),
    "mamba2": dict(hidden_size=32, num_heads=8, head_dim=8, n_groups=2, state_size=8,
                   num_hidden_layers=2, expand=2, chunk_size=8),
    "falcon_mamba": dict(hidden_size=16, state_size=4, num_hidden_layers=2, expand=2),
    "jamba": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, num_hidden_layers=2, attn_layer_period=2,
                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  num_experts=2, num_experts_per_tok=1, mamba_d_state=8, mamba_dt_rank=4),
    "bamba": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, num_hidden_layers=2, attn_layer_indices=[1],
                  mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8,
                  mamba_chunk_size=8),
    "nemotron_h": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=48, layers_block_type=["mamba", "attention"],
                       num_hidden_layers=2, mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
                       ssm_state_size=8, chunk_size=8),
    "zamba": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, num_hidden_layers=3,
                  layers_block_type=["hybrid", "mamba", "hybrid"], n_mamba_heads=2,
                  mamba_d_state=8, mamba_dt_rank=4),
    "zamba2": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=48, num_hidden_layers=2, layers_block_type=["mamba", "hybrid"],
                   n_mamba_heads=8, mamba_headdim=8, mamba_ngroups=2, mamba_d_state=8,
                   chunk_size=8, attention_head_dim=8, num_mem_blocks=1,
                   use_shared_attention_adapter=False, use_mem_rope=False),
    "gpt_neox": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     num_hidden_layers=2),
}


@pytest.mark.seam
@pytest.mark.parametrize("model_type", sorted(_HEAD_CONFIGS))
def test_chunked_head_loss_equals_the_logits_path(model_type, monkeypatch):
    """The head run a chunk of rows at a time inside the loss gives the loss and every gradient
    of the full-logits path (fp32; summation order only), with adapters on the head and the
    embeddings too, and the model's own head is back afterwards. Every type in HEAD_ONLY_TYPES
    is here, so a transformers change that scales the logits after the head fails loudly."""
    from accelerate import Accelerator

    from mamba_ft.adapters import AdapterConfig, adapter_parameters, attach_adapters
    from mamba_ft.data import IGNORE
    from mamba_ft.models import load_model
    from mamba_ft.training.step import forward_loss_sum

    assert set(_HEAD_CONFIGS) == set(loss_mod.HEAD_ONLY_TYPES)
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", 96 * 7)  # 7 rows a chunk: several chunks
    model = load_model({"model_type": model_type, "vocab_size": 96, **_HEAD_CONFIGS[model_type]},
                       need_tokenizer=False, allow_transformers=True, seed=0).model
    attach_adapters(model, AdapterConfig(targets=["all", "embeddings", "lm_head"], rank=2))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ids = torch.randint(3, 96, (2, 19), generator=gen)
    labels = ids.clone()
    labels[0, :5] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    head = model.get_output_embeddings()
    results = []
    for chunked in (False, True):
        model.zero_grad()
        loss = forward_loss_sum(model, dict(batch), Accelerator(cpu=True), backward_scale=1.0,
                                chunked_head=chunked)
        results.append((loss.item(), {n: p.grad.clone() for n, p in adapter_parameters(model).items()}))
    assert model.get_output_embeddings() is head
    (full_loss, full_grads), (chunked_loss, chunked_grads) = results
    assert chunked_loss == pytest.approx(full_loss, rel=1e-6)
    # Rounding only (a rerun of either path is bitwise equal); measured beyond rtol up to 7.5e-7
    # of a gradient's largest entry (Zamba2), 1.7e-6 for Zamba.
    of_largest = 5e-6 if model_type == "zamba" else 1e-6
    for name, g in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-5,
                                   atol=of_largest * g.abs().max().item() + 1e-9, msg=name)
