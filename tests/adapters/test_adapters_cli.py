"""`mamba-ft merge` end to end through `mamba_ft.cli.main`, and its refusals (exit code 2).

Reference: plain transformers MambaForCausalLM loaded from the merged directory must give the
adapter model's logits to 1e-5 (transformers' sequential scan vs mamba-ft's chunked scan).
"""

from __future__ import annotations

import json

import pytest
import torch
from adapter_models import VOCAB, ft_copy, plain_mamba, randomize_adapters
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, MambaForCausalLM, PreTrainedTokenizerFast

from mamba_ft.adapters import AdapterConfig, attach_adapters, save_adapters
from mamba_ft.cli import main


def save_base(path, hidden_size=32):
    plain_mamba(hidden_size=hidden_size).save_pretrained(path)
    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<eos>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    return path


@pytest.fixture
def adapter_dir(tmp_path):
    base = save_base(tmp_path / "base")
    model = ft_copy(plain_mamba())
    attach_adapters(model, AdapterConfig(targets=["all", "lm_head"], rank=3))
    randomize_adapters(model)
    save_adapters(model, tmp_path / "adapter", base_model=str(base))
    return tmp_path / "adapter", model.eval()


def test_merge_command_writes_plain_checkpoint_with_tokenizer(tmp_path, adapter_dir, ids, capsys):
    directory, model = adapter_dir
    assert main(["merge", str(directory), "--out", str(tmp_path / "merged")]) == 0
    assert "merged model written to" in capsys.readouterr().out
    plain = MambaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok("w1 w2 w3")["input_ids"] == [1, 2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_merge_refuses_existing_out_without_overwrite(tmp_path, adapter_dir, capsys):
    directory, _ = adapter_dir
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["merge", str(directory), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["merge", str(directory), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").exists() and not (out / "notes.txt").exists()
    assert main(["merge", str(directory), "--out", str(directory), "--overwrite"]) == 2


def damage_weights(directory):
    file = directory / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])


def wrong_rank(directory):
    meta = json.loads((directory / "mamba_ft_adapter.json").read_text())
    meta["config"]["rank"] = 0
    (directory / "mamba_ft_adapter.json").write_text(json.dumps(meta))


def unknown_target(directory):
    meta = json.loads((directory / "mamba_ft_adapter.json").read_text())
    meta["config"]["targets"] = ["dt_proj", "x_projj"]
    (directory / "mamba_ft_adapter.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,message", [
    (damage_weights, "damaged or truncated"),
    (wrong_rank, "rank must be a positive integer"),
    (unknown_target, "Unknown adapter target 'x_projj'"),
    (None, "does not fit this model"),  # --base: a model of another shape
])
def test_bad_adapter_exits_2_and_writes_nothing(tmp_path, adapter_dir, capsys, damage, message):
    directory, _ = adapter_dir
    args = ["merge", str(directory), "--out", str(tmp_path / "merged")]
    if damage is None:
        args += ["--base", str(save_base(tmp_path / "wide", hidden_size=64))]
    else:
        damage(directory)
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mamba-ft: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
