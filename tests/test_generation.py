"""`mamba-ft generate` against plain transformers' greedy `generate` on the same weights, and
every input a user can get wrong."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MambaForCausalLM

from mamba_ft.cli import main
from mamba_ft.models import resolve_source

PROMPT = "Q: abc A: cba\nQ: dog A: god\nQ: cat A:"

pytestmark = pytest.mark.seam  # transformers' generate drives mamba-ft's cached decoding


def plain_greedy(directory, prompt: str, new_tokens: int, model=None) -> str:
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = model or AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("options", [[], ["--no-stream"], ["--eager"]],
                         ids=["streamed", "at-once", "eager"])
@pytest.mark.parametrize("model", ["bundled:tiny-mamba", "bundled:tiny-mamba2"])
def test_generate_equals_plain_transformers_greedy(capsys, options, model):
    expected = plain_greedy(resolve_source(model), PROMPT, 12)
    args = ["generate", model, "--prompt", PROMPT, "--max-new-tokens", "12"]
    assert main(args + options) == 0
    assert capsys.readouterr().out.strip() == expected.strip()
    assert expected.strip()  # the tiny model does produce text here


def test_an_adapter_directory_generates_as_its_merged_model(tmp_path, capsys):
    """The adapter directory alone names the fine-tuned model; its text equals plain
    transformers' greedy decoding of the merged weights."""
    from mamba_ft.adapters import AdapterConfig, adapter_parameters, attach_adapters, merge_adapters, save_adapters
    from mamba_ft.models import load_model

    base = resolve_source("bundled:tiny-mamba")
    loaded = load_model(base)
    attach_adapters(loaded.model, AdapterConfig(targets=["all"], rank=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter_parameters(loaded.model).values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    adapter_dir = save_adapters(loaded.model, tmp_path / "adapter", base_model=str(base))
    merged = merge_adapters(loaded.model)
    plain = MambaForCausalLM(merged.config)
    plain.load_state_dict(merged.state_dict())
    expected = plain_greedy(base, PROMPT, 10, model=plain.eval())
    assert main(["generate", str(adapter_dir), "--prompt", PROMPT, "--max-new-tokens", "10",
                 "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_sampling_is_reproducible_with_a_seed(capsys):
    args = ["generate", "bundled:tiny-mamba", "--prompt", PROMPT, "--max-new-tokens", "12",
            "--sample", "--temperature", "1.5", "--top-k", "50", "--seed", "3", "--no-stream"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


@pytest.mark.parametrize("extra, says", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompt", "x", "--temperature", "0.7"], "only apply when sampling"),
    (["--prompt", "x", "--sample", "--temperature", "0"], "--temperature must be above 0"),
    (["--prompt", "x", "--sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--sample", "--top-k", "0"], "--top-k must be at least 1"),
    (["--prompt", "x", "--prompt-file", "f.txt"], "Give the prompt once"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "Could not read --prompt-file"),
    (["--prompt", "x", "--adapter", "/nonexistent/adapter"], "adapter directory"),
])
def test_bad_input_is_one_clear_message(extra, says, capsys):
    assert main(["generate", "bundled:tiny-mamba", *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_missing_model_is_one_clear_message(capsys):
    assert main(["generate", "/nonexistent/model", "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
