"""The seams where mamba-ft sits inside transformers' Mamba, checked so a release that moves
them fails here by name instead of decoding wrongly.

- Each class mamba-ft swaps in (`MambaFTMixer` for `MambaMixer`, `MambaFTRMSNorm` for
  `MambaRMSNorm` and `Mamba2RMSNorm`, Mamba-2's `MambaFTMamba2Mixer` and
  `MambaFTRMSNormGated`, and `MambaFTZambaMixer` for `ZambaMambaMixer`) must accept every parameter of the transformers forward it replaces, at the
  same positions: a new or renamed parameter fails the contract test naming it.
- At run time the mixer refuses keywords it does not understand, so a keyword transformers
  starts passing can never be swallowed silently (5.24 renamed `cache_params` to `cache`, and
  a mixer that ignored it decoded every token from an empty state).
"""

from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import MambaForCausalLM
from transformers.models.mamba import modeling_mamba
from transformers.models.mamba2 import modeling_mamba2
from transformers.models.zamba import modeling_zamba

from mamba_ft.compat import SUPPORTED_TRANSFORMERS
from mamba_ft.errors import UserError
from mamba_ft.modules.mamba_mixer import MambaFTMixer
from mamba_ft.models.loading import load_model
from mamba_ft.models.swap import swap_mixers, swap_norms
from mamba_ft.modules import (MambaFTMamba2Mixer, MambaFTRMSNorm, MambaFTRMSNormGated,
                              MambaFTZambaMixer)

# Touches transformers / PEFT internals: .ci/run re-runs it on the lowest supported versions.
pytestmark = pytest.mark.seam

# transformers 5.23 calls Mamba-2's gated norm MambaRMSNormGated, 5.24 and later Mamba2RMSNormGated.
GATED_NORM = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
SWAPPED = [(modeling_mamba.MambaMixer, MambaFTMixer), (modeling_mamba.MambaRMSNorm, MambaFTRMSNorm),
           (modeling_mamba2.Mamba2Mixer, MambaFTMamba2Mixer),
           (GATED_NORM, MambaFTRMSNormGated),
           (modeling_mamba2.Mamba2RMSNorm, MambaFTRMSNorm),
           (modeling_zamba.ZambaMambaMixer, MambaFTZambaMixer)]


# transformers 5.23 names the mixer's second parameter `cache_params`, 5.24 and later `cache`;
# the mixer takes the cache positionally as `cache` and by keyword under either name.
SAME_PARAMETER = {"cache_params": "cache"}


def _parameters(fn):
    # inspect.signature follows the __wrapped__ chain of transformers' decorators
    # (deprecate_kwarg, force_accelerate_hooks) down to the real forward.
    return [p for p in inspect.signature(fn).parameters.values()
            if p.name != "self" and p.kind is not p.VAR_KEYWORD]


def signature_drift(theirs, ours) -> list[str]:
    """What `ours` lacks of `theirs`: parameters it does not accept by name or takes at
    another position. Empty when every call transformers can make is understood."""
    ours_params = _parameters(ours)
    ours_names = {p.name: p for p in ours_params}
    ours_positional = [p.name for p in ours_params
                       if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    for index, param in enumerate(_parameters(theirs)):
        if param.name not in ours_names:
            problems.append(f"parameter {param.name!r} is not accepted")
        elif param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            name = SAME_PARAMETER.get(param.name, param.name)
            if index >= len(ours_positional) or ours_positional[index] != name:
                problems.append(f"parameter {param.name!r} is not at position {index}")
    return problems


@pytest.mark.parametrize("theirs,ours", SWAPPED, ids=lambda c: c.__name__)
def test_swapped_forward_accepts_every_transformers_parameter(theirs, ours):
    drift = signature_drift(theirs.forward, ours.forward)
    assert not drift, (f"transformers {transformers.__version__} {theirs.__name__}.forward "
                       f"moved: {'; '.join(drift)}; update {ours.__name__}.forward")


def test_contract_fails_naming_a_parameter_transformers_adds(monkeypatch):
    real = modeling_mamba.MambaMixer.forward

    def forward(self, hidden_states, cache=None, attention_mask=None, seq_idx=None, **kwargs):
        return real(self, hidden_states, cache, attention_mask, **kwargs)

    monkeypatch.setattr(modeling_mamba.MambaMixer, "forward", forward)
    drift = signature_drift(modeling_mamba.MambaMixer.forward, MambaFTMixer.forward)
    assert drift == ["parameter 'seq_idx' is not accepted"]


def test_contract_fails_when_transformers_renames_the_cache(monkeypatch):
    def forward(self, hidden_states, past_state=None, attention_mask=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(modeling_mamba.MambaMixer, "forward", forward)
    drift = signature_drift(modeling_mamba.MambaMixer.forward, MambaFTMixer.forward)
    assert "parameter 'past_state' is not accepted" in drift


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = MambaForCausalLM(config).eval()
    swap_mixers(model)
    swap_norms(model)
    return model


def test_every_block_calls_the_mixer_with_keywords_it_accepts(tiny_mamba_config):
    """transformers' MambaBlock, prefill and decode, passes only what the mixer declares."""
    model = _model(tiny_mamba_config)
    accepted = {p.name for p in _parameters(MambaFTMixer.forward)}
    seen: list[set[str]] = []
    mixer = model.backbone.layers[0].mixer
    hook = mixer.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    ids = torch.randint(0, tiny_mamba_config.vocab_size, (1, 6))
    model.generate(ids, max_new_tokens=3, do_sample=False)
    hook.remove()
    assert len(seen) == 3 and all(keys <= accepted for keys in seen), seen
    assert all(keys & {"cache", "cache_params"} for keys in seen), "the cache never reached the mixer"


def test_mixer_refuses_an_unknown_keyword_naming_it_and_the_version(tiny_mamba_config):
    mixer = _model(tiny_mamba_config).backbone.layers[0].mixer
    x = torch.randn(1, 4, tiny_mamba_config.hidden_size)
    with pytest.raises(TypeError, match=r"seq_idx.*transformers " + transformers.__version__):
        mixer(x, seq_idx=None)
    with pytest.raises(TypeError, match="both `cache` and `cache_params`"):
        mixer(x, cache=object(), cache_params=object())


def test_cache_under_either_name_gives_the_same_decoding(tiny_mamba_config):
    """The mixer reads the cache whether it arrives as `cache` (5.24+) or `cache_params`
    (5.23): prefill + one step equals the full forward either way (fp32, 1e-5)."""
    from transformers import DynamicCache

    model = _model(tiny_mamba_config)
    mixer = model.backbone.layers[0].mixer
    x = torch.randn(2, 7, tiny_mamba_config.hidden_size)
    with torch.no_grad():
        full = mixer(x)
        for name in ("cache", "cache_params"):
            cache = DynamicCache(config=tiny_mamba_config)
            prefill = mixer(x[:, :6], **{name: cache})
            step = mixer(x[:, 6:], **{name: cache})
            torch.testing.assert_close(torch.cat([prefill, step], 1), full, rtol=1e-5, atol=1e-5)


def test_transformers_version_is_inside_the_declared_range():
    from packaging.specifiers import SpecifierSet

    assert transformers.__version__ in SpecifierSet(SUPPORTED_TRANSFORMERS), (
        f"transformers {transformers.__version__} is outside {SUPPORTED_TRANSFORMERS}")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


def _unsafe_checkpoint(directory: Path, config, ssm_format: bool) -> Path:
    model = MambaForCausalLM(config)
    state = dict(model.state_dict())
    state["payload"] = _RunsCode()
    if ssm_format:
        (directory / "config.json").write_text(
            '{"d_model": 32, "n_layer": 2, "vocab_size": 96, "ssm_cfg": {"d_state": 8}}')
    else:
        config.save_pretrained(directory)
    torch.save(state, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("ssm_format", [False, True], ids=["hf-layout", "mamba_ssm-layout"])
def test_a_checkpoint_that_would_run_code_is_refused_in_one_sentence(tmp_path, tiny_mamba_config,
                                                                     ssm_format, monkeypatch):
    directory = _unsafe_checkpoint(tmp_path, tiny_mamba_config, ssm_format)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="pickle that would run code") as info:
        load_model(directory, need_tokenizer=False)
    message = str(info.value)
    assert "weights_only=False" not in message and "damaged" not in message
    assert "safetensors" in message
    assert not (tmp_path / "ran-code").exists()
    # The file is what it claims: torch's weights-only loader refuses it too.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(directory / "pytorch_model.bin", weights_only=True)


def test_unsafe_checkpoint_exits_2_from_the_cli(tmp_path, tiny_mamba_config):
    (tmp_path / "ckpt").mkdir()
    directory = _unsafe_checkpoint(tmp_path / "ckpt", tiny_mamba_config, False)
    proc = subprocess.run([sys.executable, "-m", "mamba_ft.cli", "info", str(directory)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "would run code" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ran-code").exists()


def test_a_cache_that_records_past_states_is_refused(tiny_mamba_config):
    """Assisted and speculative decoding ask the cache to keep past states for rollback; the
    mixer does not write them, so it refuses instead of leaving a rollback that is wrong."""
    from transformers import DynamicCache

    mixer = _model(tiny_mamba_config).backbone.layers[0].mixer
    cache = DynamicCache(config=tiny_mamba_config)
    cache.activate_past_recording()
    with pytest.raises(NotImplementedError, match="assisted or speculative"):
        mixer(torch.randn(1, 3, tiny_mamba_config.hidden_size), cache)
