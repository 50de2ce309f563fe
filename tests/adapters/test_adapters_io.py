"""Saving, loading and merging adapters; configuration errors; damaged or mismatched files.

References: the adapter model's own logits (save -> load must be bitwise identical: the same
tensors through the same ops), plain transformers MambaForCausalLM for merged checkpoints and
plain PEFT for the PEFT part (1e-5: transformers' sequential scan vs mamba-ft's chunked scan).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapter_models import ft_copy, plain_mamba, randomize_adapters
from pydantic import ValidationError
from transformers import MambaForCausalLM

from mamba_ft.adapters import (
    AdapterConfig,
    adapter_base_model,
    adapter_parameters,
    attach_adapters,
    attached,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from mamba_ft.errors import UserError

# Touches transformers / PEFT internals: .ci/run re-runs it on the lowest supported versions.
pytestmark = pytest.mark.seam

EVERYTHING = ["all", "embeddings", "lm_head"]


def adapted(targets, seed=0, hidden_size=32, **kw):
    model = ft_copy(plain_mamba(seed, hidden_size))
    attach_adapters(model, AdapterConfig(targets=targets, rank=3, **kw))
    randomize_adapters(model)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_save_load_gives_identical_logits(tmp_path, ids):
    model = adapted(EVERYTHING, rank_per_target={"conv1d": 2, "embeddings": 5}, dropout=0.1)
    save_adapters(model, tmp_path / "ad", base_model="bundled:whatever")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "mamba_ft_adapter.json", "mamba_ft_adapter.safetensors"]
    assert adapter_base_model(tmp_path / "ad") == "bundled:whatever"

    fresh = ft_copy(plain_mamba())
    load_adapters(fresh, tmp_path / "ad")
    fresh.eval()
    assert attached(fresh).config == attached(model).config
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(fresh))


def test_local_base_path_is_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    save_adapters(adapted(["D"]), "ad", base_model="base")
    assert adapter_base_model(tmp_path / "ad") == str((tmp_path / "base").resolve())


def test_merge_gives_plain_transformers_checkpoint(tmp_path, ids):
    model = adapted(EVERYTHING)
    expected = logits(model, ids)
    merge_adapters(model)
    assert attached(model) is None and not adapter_parameters(model)
    model.save_pretrained(tmp_path / "merged")
    plain = MambaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(plain.backbone.layers[0].mixer).__name__ == "MambaMixer"
    # Embeddings and head were adapted separately, so the merged model has them untied.
    assert plain.lm_head.weight.data_ptr() != plain.backbone.embeddings.weight.data_ptr()
    torch.testing.assert_close(logits(plain, ids), expected, rtol=0, atol=1e-5)


def test_peft_loads_the_targets_it_can_apply(tmp_path, ids):
    from peft import PeftModel

    model = adapted(["in_proj", "x_proj", "embeddings", "lm_head"], rank_per_target={"x_proj": 2}, layers=[1])
    save_adapters(model, tmp_path / "ad", base_model="x")
    assert not (tmp_path / "ad" / "mamba_ft_adapter.safetensors").exists()
    peft_model = PeftModel.from_pretrained(plain_mamba(), tmp_path / "ad").eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_peft_ignores_mamba_ft_only_targets(tmp_path, ids):
    """conv1d and dt_proj live in mamba-ft's own file: PEFT applies in_proj alone."""
    from peft import PeftModel

    model = adapted(["in_proj", "conv1d", "dt_proj"])
    save_adapters(model, tmp_path / "ad", base_model="x")
    meta = json.loads((tmp_path / "ad" / "mamba_ft_adapter.json").read_text())
    assert meta["peft_targets"] == ["in_proj"] and meta["mamba_ft_only_targets"] == ["conv1d", "dt_proj"]
    peft_model = PeftModel.from_pretrained(plain_mamba(), tmp_path / "ad").eval()
    in_proj_only = ft_copy(plain_mamba())
    attach_adapters(in_proj_only, AdapterConfig(targets=["in_proj"], rank=3))
    with torch.no_grad():
        for mixer_a, mixer_b in zip(in_proj_only.backbone.layers, model.backbone.layers):
            mixer_a.mixer.adapter.load_state_dict(
                {k: v for k, v in mixer_b.mixer.adapter.state_dict().items() if "in_proj" in k})
    in_proj_only.eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(in_proj_only, ids), rtol=0, atol=1e-5)
    assert (logits(in_proj_only, ids) - logits(model, ids)).abs().max() > 1e-3


def test_adapter_for_another_shape_is_refused_and_model_untouched(tmp_path, ids):
    save_adapters(adapted(EVERYTHING), tmp_path / "ad", base_model="small")
    other = ft_copy(plain_mamba(hidden_size=64))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(UserError, match="does not fit this model.*small"):
        load_adapters(other, tmp_path / "ad")
    assert attached(other) is None and not adapter_parameters(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert all(p.requires_grad for p in other.parameters())


def test_corrupted_safetensors_is_refused(tmp_path):
    save_adapters(adapted(EVERYTHING), tmp_path / "ad", base_model="x")
    for name in ("adapter_model.safetensors", "mamba_ft_adapter.safetensors"):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(tmp_path / "ad", broken)
        data = (broken / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2])  # truncated
        model = ft_copy(plain_mamba())
        with pytest.raises(UserError, match="damaged or truncated"):
            load_adapters(model, broken)
        assert attached(model) is None


def test_wrong_model_type_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_adapters(ft_copy(plain_mamba()), tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not written by mamba-ft"):
        adapter_base_model(tmp_path / "empty")
    save_adapters(adapted(["D"]), tmp_path / "ad", base_model="x")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64))
    with pytest.raises(UserError, match="made for a 'mamba' model"):
        load_adapters(neox, tmp_path / "ad")


def test_config_errors_list_the_valid_targets():
    with pytest.raises(ValidationError) as err:
        AdapterConfig(targets=["x_proj", "dt_prj"])
    text = str(err.value)
    assert "Unknown adapter target 'dt_prj'. Did you mean 'dt_proj'?" in text
    for name in ("in_proj", "conv1d", "x_proj.dt", "x_proj.B", "x_proj.C", "A_log", "dt_bias", "lm_head", "all"):
        assert name in text
    with pytest.raises(ValidationError, match="rank must be a positive integer, not 0"):
        AdapterConfig(targets=["in_proj"], rank=0)
    with pytest.raises(ValidationError, match="must be a positive integer, not -1"):
        AdapterConfig(targets=["in_proj"], rank_per_target={"in_proj": -1})
    with pytest.raises(ValidationError, match="x_proj.*row block"):
        AdapterConfig(targets=["all", "x_proj.B"])
    with pytest.raises(ValidationError, match="without a rank"):
        AdapterConfig(targets=["A_log"], rank_per_target={"A_log": 2})
    with pytest.raises(ValidationError, match="Did you mean 'in_proj'"):
        AdapterConfig(targets=["in_proj"], rank_per_target={"inproj": 2})
    with pytest.raises(ValidationError, match="Extra inputs"):
        AdapterConfig(targets=["in_proj"], ranks=2)
    # Names shared with Transformers pass the config and are checked against the model.
    config = AdapterConfig(targets=["in_proj", "outproj"])
    with pytest.raises(UserError) as err:
        attach_adapters(ft_copy(plain_mamba()), config)
    assert "Did you mean 'out_proj'?" in str(err.value) and "x_proj.dt" in str(err.value)


def test_unswapped_transformers_mamba_is_refused():
    """transformers' own mixer reads raw weights: adapters there would be bypassed."""
    model = plain_mamba()
    with pytest.raises(UserError, match="swap_mixers"):
        attach_adapters(model, AdapterConfig(targets=["in_proj"]))
    assert attached(model) is None and all(p.requires_grad for p in model.parameters())
