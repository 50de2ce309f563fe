"""Transformer baselines: the same AdapterConfig becomes PEFT LoRA on a tiny GPT-NeoX.

References: plain PEFT (`PeftModel.from_pretrained`) and plain transformers after merging;
save -> load is bitwise identical, merge to 1e-5 (fp32, merged matmul vs separate LoRA path).
"""

from __future__ import annotations

import pytest
import torch
from adapter_models import randomize_adapters
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mamba_ft.adapters import (
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


def neox(seed=0, hidden_size=32):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


CONFIG = AdapterConfig(targets=["query_key_value", "dense", "embeddings", "lm_head"], rank=4,
                       rank_per_target={"dense": 2}, layers=[1])


def test_peft_lora_trains_saves_loads_and_merges(tmp_path, ids):
    model = neox()
    report = attach_adapters(model, CONFIG)
    rows = {r.target: (r.modules, r.parameters) for r in report.rows}
    # layer 1 only: query_key_value (96x32): A 4x32 + B 96x4; `dense` matches attention.dense (32x32)
    # with rank 2; embeddings A 4x64 + B 32x4; the head (64x32) A 4x32 + B 64x4.
    assert rows == {"query_key_value": (1, 4 * 32 + 96 * 4), "dense": (1, 2 * 32 + 32 * 2),
                    "embeddings": (1, 4 * 64 + 32 * 4), "lm_head": (1, 4 * 32 + 64 * 4)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_parameters(model))
    randomize_adapters(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    check_adapter_gradients(model)
    assert all(p.grad.abs().sum() > 0 for p in adapter_parameters(model).values())
    model.eval()
    expected = logits(model, ids)
    assert (expected - logits(neox(), ids)).abs().max() > 1e-3

    save_adapters(model, tmp_path / "ad", base_model="pythia-tiny")
    from peft import PeftModel

    torch.testing.assert_close(logits(PeftModel.from_pretrained(neox(), tmp_path / "ad").eval(), ids),
                               expected, rtol=0, atol=0)
    fresh = neox()
    load_adapters(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh.eval(), ids), expected)

    merge_adapters(fresh)
    assert attached(fresh) is None and not adapter_parameters(fresh)
    fresh.save_pretrained(tmp_path / "merged")
    plain = GPTNeoXForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(plain, ids), expected, rtol=0, atol=1e-5)


def test_baseline_target_errors(tmp_path):
    with pytest.raises(UserError, match="exists only in Mamba models.*query_key_value"):
        attach_adapters(neox(), AdapterConfig(targets=["dt_proj"]))
    with pytest.raises(UserError, match="Did you mean 'dense'"):
        attach_adapters(neox(), AdapterConfig(targets=["dens"]))
    with pytest.raises(UserError, match="layer 7"):
        attach_adapters(neox(), AdapterConfig(targets=["dense"], layers=[7]))
    model = neox()
    attach_adapters(model, CONFIG)
    save_adapters(model, tmp_path / "ad", base_model="x")
    wide = neox(hidden_size=64)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(UserError, match="does not fit this model"):
        load_adapters(wide, tmp_path / "ad")
    assert attached(wide) is None
    assert set(wide.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())


def test_all_linear_alias_covers_every_linear_but_the_head():
    model = neox()
    attach_adapters(model, AdapterConfig(targets=["all_linear"], rank=2))
    adapted = set(attached(model).module_targets)
    plain = neox()
    head = plain.get_output_embeddings()
    linears = {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    assert len(linears) == 8  # 2 layers x (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)
    assert adapted == linears
