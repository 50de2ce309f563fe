"""Loading every kind of source, and the one-sentence errors for each way it can go wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPTNeoXConfig, MambaForCausalLM

from mamba_ft.cli import main
from mamba_ft.errors import UserError
from mamba_ft.modules.mamba_mixer import MambaFTMixer
from mamba_ft.models import load_model

# Touches transformers / PEFT internals: .ci/run re-runs it on the lowest supported versions.
pytestmark = pytest.mark.seam

TOL = dict(atol=1e-5, rtol=1e-5)


def save_hf_dir(config, path, tokenizer_factory=None):
    model = MambaForCausalLM(config)
    model.save_pretrained(path)
    if tokenizer_factory:
        tokenizer_factory(path)
    return model


def save_mamba_ssm_dir(model: MambaForCausalLM, path, vocab_size, pad_multiple):
    """Write `model` the way mamba_ssm's save_pretrained does: its config keys and key names."""
    cfg = model.config
    path.mkdir()
    raw = {"d_model": cfg.hidden_size, "n_layer": cfg.num_hidden_layers, "vocab_size": vocab_size,
           "ssm_cfg": {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": cfg.expand,
                       "dt_rank": cfg.time_step_rank},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": pad_multiple, "tie_embeddings": True}
    (path / "config.json").write_text(json.dumps(raw))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in model.state_dict().items()}
    torch.save(state, path / "pytorch_model.bin")


def test_hf_directory_loads_with_tokenizer_and_swapped_mixers(tiny_mamba_config, tmp_path, word_tokenizer_factory):
    original = save_hf_dir(tiny_mamba_config, tmp_path, word_tokenizer_factory)
    loaded = load_model(tmp_path)
    assert loaded.is_mamba and loaded.tokenizer is not None
    assert all(isinstance(layer.mixer, MambaFTMixer) for layer in loaded.model.backbone.layers)
    ids = torch.randint(0, tiny_mamba_config.vocab_size, (2, 9))
    torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits, **TOL)


def test_mamba_ssm_directory_converts_with_identical_logits(tiny_mamba_config, tmp_path):
    # vocab 90 padded to a multiple of 16 -> 96 = the model's embedding rows.
    reference = MambaForCausalLM(tiny_mamba_config).eval()
    save_mamba_ssm_dir(reference, tmp_path / "ssm", vocab_size=90, pad_multiple=16)
    loaded = load_model(tmp_path / "ssm", need_tokenizer=False)
    assert loaded.model.config.vocab_size == 96
    ids = torch.randint(0, 90, (2, 11))
    torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, **TOL)


def test_config_alone_gives_random_init_and_seed_is_reproducible(tmp_path):
    cfg = {"model_type": "mamba", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "state_size": 4}
    (tmp_path / "tiny.yaml").write_text("\n".join(f"{k}: {v}" for k, v in cfg.items()))
    a = load_model(tmp_path / "tiny.yaml", need_tokenizer=False, seed=3).model
    b = load_model(cfg, need_tokenizer=False, seed=3).model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_transformer_baseline_loads_only_when_allowed(tmp_path):
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64).to_dict()
    loaded = load_model(cfg, need_tokenizer=False, allow_transformers=True)
    assert not loaded.is_mamba
    # The message lists every type served.
    with pytest.raises(UserError, match=r"not one with Mamba layers \(Mamba \('mamba'\), "
                                        r"Mamba-2 \('mamba2'\), .*Zamba \('zamba'\)"):
        load_model(cfg, need_tokenizer=False)


def run_cli(*args):
    """The real console entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mamba_ft.cli", *args], capture_output=True, text=True)


def run_main(capsys, *args):
    """The same entry point in-process (faster), with what it printed."""
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("mamba-ft: error: ")
    for fragment in fragments:
        assert fragment in message, message


def test_cli_missing_path(tmp_path):
    # Once through a real subprocess: exit code 2 and no traceback as a user sees them.
    assert_clean_error(run_cli("info", str(tmp_path / "nope")), "does not exist")


def test_cli_weights_that_do_not_fit_the_config(tiny_mamba_config, tmp_path, word_tokenizer_factory, capsys):
    save_hf_dir(tiny_mamba_config, tmp_path, word_tokenizer_factory)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["state_size"] = 16
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert_clean_error(run_main(capsys, "info", str(tmp_path)), "do not fit its config.json", "A_log")


def test_mamba_ssm_weights_that_do_not_fit(tiny_mamba_config, tmp_path):
    save_mamba_ssm_dir(MambaForCausalLM(tiny_mamba_config), tmp_path / "ssm", 96, 8)
    raw = json.loads((tmp_path / "ssm" / "config.json").read_text())
    raw["d_model"] = 48
    (tmp_path / "ssm" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="do not fit"):
        load_model(tmp_path / "ssm", need_tokenizer=False)


def test_cli_directory_without_tokenizer(tiny_mamba_config, tmp_path, capsys):
    save_hf_dir(tiny_mamba_config, tmp_path)
    assert_clean_error(run_main(capsys, "info", str(tmp_path)), "has no tokenizer", "model.tokenizer")


def test_cli_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "info", str(tmp_path / "nope"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_cli_info_on_a_good_directory(tiny_mamba_config, tmp_path, word_tokenizer_factory, capsys):
    """Every figure `info` prints comes from the checkpoint: compared with plain transformers."""
    save_hf_dir(tiny_mamba_config, tmp_path, word_tokenizer_factory)
    capsys.readouterr()
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    plain = MambaForCausalLM.from_pretrained(str(tmp_path))
    c = plain.config
    assert "Mamba (mamba-ft mixers: 2)" in out
    assert (f"d_model {c.hidden_size}, {c.num_hidden_layers} layers, d_inner {c.intermediate_size}, "
            f"state {c.state_size}, conv {c.conv_kernel}, dt rank {c.time_step_rank}") in out
    assert f"{sum(p.numel() for p in plain.parameters()):,}" in out
    assert f"vocabulary      {c.vocab_size} (tokenizer:" in out
    assert "dtype           float32" in out and "A_log" in out and "aliases all_linear, all" in out


def test_loaded_models_carry_the_swapped_norms_with_unchanged_state_dict():
    """load_model swaps every MambaRMSNorm (blocks and norm_f) keeping the same weight
    parameters: state_dict keys equal plain transformers', and so do the logits (CPU, fp32;
    1e-5: the mixers sum in another order than transformers' slow path)."""
    from transformers import MambaConfig, MambaForCausalLM

    from mamba_ft.models import load_model
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm

    from mamba_ft.modules import MambaFTRMSNorm

    cfg = dict(model_type="mamba", vocab_size=64, hidden_size=16, state_size=4,
               num_hidden_layers=2, expand=2, conv_kernel=4)
    model = load_model(dict(cfg), need_tokenizer=False, seed=0).model
    plain = MambaForCausalLM(MambaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    plain.load_state_dict(model.state_dict())
    norms = [m for m in model.modules() if isinstance(m, MambaFTRMSNorm)]
    assert len(norms) == 3 and not any(isinstance(m, MambaRMSNorm) for m in model.modules())
    assert list(model.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
