"""Loading Mamba-2: Hugging Face directories, configs for random init, the original mamba_ssm
format (`ssm_cfg.layer: Mamba2`), `mamba-ft info`, and the refusals for what cannot convert
exactly. fp32 logits agree to 1e-5 (the same weights through the same mixer; only the
loading path differs, so any mistake in it is O(1))."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Mamba2ForCausalLM

from mamba_ft.cli import main
from mamba_ft.errors import UserError
from mamba_ft.models import load_model, mixers
from mamba_ft.modules import MambaFTMamba2Mixer

# Touches transformers internals: .ci/run re-runs it on the lowest supported versions.
pytestmark = pytest.mark.seam

TOL = dict(atol=1e-5, rtol=1e-5)


def _randomize(model):
    with torch.no_grad():  # D = 1 and unit norms at init would hide a misplaced tensor
        for name, p in model.named_parameters():
            if name.endswith((".D", "norm.weight")):
                p.normal_(1.0, 0.3)
    return model.eval()


def save_mamba_ssm_dir(model: Mamba2ForCausalLM, path, vocab_size, pad_multiple, **ssm_extra):
    """Write `model` the way mamba_ssm's save_pretrained does: its config keys and key names."""
    cfg = model.config
    path.mkdir()
    ssm_cfg = {"layer": "Mamba2", "d_state": cfg.state_size, "d_conv": cfg.conv_kernel,
               "expand": cfg.expand, "headdim": cfg.head_dim, "ngroups": cfg.n_groups,
               "chunk_size": cfg.chunk_size, "rmsnorm": True, "norm_before_gate": False,
               "dt_min": 0.001, "dt_max": 0.1}
    ssm_cfg.update(ssm_extra)
    raw = {"d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_hidden_layers,
           "vocab_size": vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": pad_multiple, "tie_embeddings": True}
    (path / "config.json").write_text(json.dumps(raw))
    # mamba_ssm's model keeps the tied head under its own key too; drop it to check the tie.
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, path / "pytorch_model.bin")
    return path


def test_hf_directory_loads_with_mamba2_mixers(tiny_mamba2_config, tmp_path, word_tokenizer_factory):
    original = _randomize(Mamba2ForCausalLM(tiny_mamba2_config))
    original.save_pretrained(tmp_path)
    word_tokenizer_factory(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.is_mamba and loaded.tokenizer is not None
    assert all(isinstance(layer.mixer, MambaFTMamba2Mixer) for layer in loaded.model.backbone.layers)
    ids = torch.randint(0, tiny_mamba2_config.vocab_size, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, **TOL)


def test_config_alone_gives_random_init_and_seed_is_reproducible(tmp_path):
    cfg = {"model_type": "mamba2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
           "num_heads": 4, "head_dim": 16, "n_groups": 2, "state_size": 8, "chunk_size": 16}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    a = load_model(tmp_path / "tiny.json", need_tokenizer=False, seed=3)
    b = load_model(cfg, need_tokenizer=False, seed=3)
    assert a.is_mamba and len(mixers(a.model)) == 2
    assert isinstance(a.model, Mamba2ForCausalLM)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_mamba_ssm_directory_gives_the_logits_of_its_hf_conversion(tiny_mamba2_config, tmp_path):
    # vocab 90 padded to a multiple of 16 -> 96 = the model's embedding rows.
    tiny_mamba2_config.tie_word_embeddings = True
    reference = _randomize(Mamba2ForCausalLM(tiny_mamba2_config))
    save_mamba_ssm_dir(reference, tmp_path / "ssm", vocab_size=90, pad_multiple=16,
                       dt_limit=[0.0, 0.5])
    loaded = load_model(tmp_path / "ssm", need_tokenizer=False)
    config = loaded.model.config
    assert config.model_type == "mamba2" and config.vocab_size == 96
    assert (config.num_heads, config.head_dim, config.n_groups, config.chunk_size) == (8, 8, 2, 8)
    assert tuple(config.time_step_limit) == (0.0, 0.5)
    assert len(mixers(loaded.model)) == 2
    # Its HF conversion: the same weights under transformers' names in plain transformers.
    reference.config.time_step_limit = (0.0, 0.5)
    for layer in reference.backbone.layers:
        layer.mixer.time_step_limit = (0.0, 0.5)
    converted = tmp_path / "hf"
    reference.save_pretrained(converted)
    plain = Mamba2ForCausalLM.from_pretrained(converted).eval()
    ids = torch.randint(0, 90, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, plain(ids).logits, **TOL)


@pytest.mark.parametrize("extra,match", [
    (dict(D_has_hdim=True), "D per channel"),
    (dict(d_ssm=32), "d_ssm=32"),
    (dict(norm_before_gate=True), "before the gate"),
    (dict(rmsnorm=False), "no gated RMSNorm"),
    (dict(use_bc_norm=True), "use_bc_norm"),
    (dict(layer="Mamba3"), "Mamba3"),
])
def test_mamba_ssm_variants_that_cannot_convert_exactly_are_refused(tiny_mamba2_config, tmp_path,
                                                                    extra, match):
    save_mamba_ssm_dir(Mamba2ForCausalLM(tiny_mamba2_config), tmp_path / "ssm", 96, 8, **extra)
    with pytest.raises(UserError, match=match):
        load_model(tmp_path / "ssm", need_tokenizer=False)


def test_mamba_ssm_norm_epsilon_other_than_the_gated_norms_is_refused(tiny_mamba2_config, tmp_path):
    directory = save_mamba_ssm_dir(Mamba2ForCausalLM(tiny_mamba2_config), tmp_path / "ssm", 96, 8)
    raw = json.loads((directory / "config.json").read_text())
    raw["norm_epsilon"] = 1e-6
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="norm_epsilon"):
        load_model(directory, need_tokenizer=False)


def test_info_describes_a_mamba2_model(tiny_mamba2_config, tmp_path, word_tokenizer_factory, capsys):
    Mamba2ForCausalLM(tiny_mamba2_config).save_pretrained(tmp_path)
    word_tokenizer_factory(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Mamba-2 (mamba-ft Mamba-2 mixers: 2 of 2 layers)" in out
    assert "8 heads x 8, 2 B/C group(s), state 8" in out and "chunk 8" in out
    assert "in_proj.dt" in out and "norm" in out and "aliases all_linear, all" in out


def test_mamba2_weights_that_do_not_fit_the_config_are_named(tiny_mamba2_config, tmp_path):
    Mamba2ForCausalLM(tiny_mamba2_config).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["state_size"] = 16
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="do not fit its config.json"):
        load_model(tmp_path, need_tokenizer=False)


def test_loaded_mamba2_takes_adapters(tiny_mamba2_config):
    """load_model's Mamba-2 takes adapters on its mixers (tests/adapters/test_mamba2_adapters.py
    tests them, tests/adapters/test_mamba2_qlora.py on a quantised base)."""
    from mamba_ft.adapters import AdapterConfig, attach_adapters

    model = load_model(tiny_mamba2_config, need_tokenizer=False).model
    report = attach_adapters(model, AdapterConfig(targets=["all"], rank=4))
    assert [r.target for r in report.rows] == ["in_proj", "conv1d", "out_proj", "norm", "A_log",
                                               "D", "dt_bias"]
    assert all(m.adapter is not None for m in mixers(model))
