"""Recipe validation: unknown keys with did-you-mean at every level, key paths in type errors,
dotted overrides, the resolved recipe, and every shipped recipe validates."""

from pathlib import Path

import pytest
import yaml

from mamba_ft.cli import main
from mamba_ft.errors import UserError
from mamba_ft.recipe import Recipe, apply_override, load_recipe

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {
    "model": {"source": "bundled:tiny-mamba"},
    "data": {"train": {"path": "bundled:data/rotate-train.jsonl"}, "format": "completion"},
    "run": {"output_dir": "out", "max_steps": 3},
}


def write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path, data, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, data), list(overrides))
    return str(info.value)


@pytest.mark.parametrize("where, typo, meant", [
    ((), "optimm", "optim"),                           # top level
    (("run",), "max_step", "max_steps"),               # a section
    (("data", "train"), "pth", "path"),                # a nested section
    (("adapter",), "rnak", "rank"),                    # the adapters' own config
])
def test_unknown_key_names_path_and_suggestion(tmp_path, where, typo, meant):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["adapter"] = {"targets": ["in_proj"]}
    node = data
    for part in where:
        node = node[part]
    node[typo] = 1
    message = error_of(tmp_path, data)
    assert ".".join(where + (typo,)) in message
    assert f"Did you mean {meant!r}" in message


def test_wrong_type_names_the_key_path(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["run"]["micro_batch_size"] = "eight"
    message = error_of(tmp_path, data)
    assert "'run.micro_batch_size'" in message and "'eight'" in message


def test_missing_and_conflicting_keys(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    del data["run"]["output_dir"]
    assert "'run.output_dir' is missing" in error_of(tmp_path, data)
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["run"]["epochs"] = 1
    assert "exactly one of 'max_steps' or 'epochs'" in error_of(tmp_path, data)


def test_dotted_overrides(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["adapter"] = {"targets": ["in_proj"]}
    recipe = load_recipe(write(tmp_path, data), ["optim.lr=1e-4", "run.max_steps=50",
                                                 "data.packing=true", "adapter.rank=4"])
    assert recipe.optim.lr == 1e-4 and recipe.run.max_steps == 50
    assert recipe.data.packing is True and recipe.adapter.rank == 4
    assert load_recipe(write(tmp_path, data), ["adapter=none"]).adapter is None
    # An override can fill a section that was 'none'.
    data["adapter"] = "none"
    assert load_recipe(write(tmp_path, data), ["adapter.targets=[x_proj]"]).adapter.targets == ["x_proj"]
    message = error_of(tmp_path, data, ["optim.lrr=1"])
    assert "optim.lrr" in message and "Did you mean 'lr'" in message
    with pytest.raises(UserError, match="key.path=value"):
        apply_override({}, "optim.lr")


def test_resolved_yaml_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["optim.lr=3e-4"])
    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert again.optim.lr == 3e-4 and again.schedule.kind == "cosine"  # defaults are spelled out


def test_validate_command_prints_resolved_recipe(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, MINIMAL)), "run.seed=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["seed"] == 7 and printed["precision"]["mode"] == "fp32"


def test_validate_typo_exits_2_without_traceback(tmp_path, capsys):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["precison"] = {"mode": "bf16"}
    assert main(["validate", str(write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'precision'" in err and "Traceback" not in err


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())) == recipe


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("**/*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_validate_command_accepts_every_shipped_file(path, capsys):
    """Training recipes and synthetic specs alike; the resolved YAML printed is what the
    toolkit's own loader gives for that file."""
    from mamba_ft.synthetic.spec import load_spec

    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    synthetic = path.parent.name == "synthetic"
    assert ("synthetic spec" if synthetic else "training recipe") in out.splitlines()[0]
    expected = load_spec(str(path)).model_dump(mode="json") if synthetic else load_recipe(path).model_dump(mode="json")
    assert yaml.safe_load(out) == expected


def test_validate_checks_a_synthetic_spec_fully(tmp_path, capsys):
    spec = yaml.safe_load((REPO / "recipes" / "synthetic" / "copy_cpu.yaml").read_text())
    spec["test_lengths"] = [3, 0]
    assert main(["validate", str(write(tmp_path, spec))]) == 2
    err = capsys.readouterr().err
    assert "length" in err.lower() and "Traceback" not in err


def test_frozen_dtype_moved_under_precision_with_a_notice(tmp_path, capsys):
    """adapter.frozen_dtype (float32 / bfloat16 / float16) still validates, as
    precision.frozen_base in the precision vocabulary, with a one-line notice; a disagreeing
    pair and a frozen base without adapters are refused."""
    old = yaml.safe_load(yaml.safe_dump(MINIMAL))
    old["adapter"] = {"targets": ["in_proj"], "frozen_dtype": "bfloat16"}
    new = yaml.safe_load(yaml.safe_dump(MINIMAL))
    new["adapter"] = {"targets": ["in_proj"]}
    new["precision"] = {"frozen_base": "bf16"}
    from_old = load_recipe(write(tmp_path, old))
    notice = capsys.readouterr().err
    assert "adapter.frozen_dtype has moved to precision.frozen_base" in notice
    assert len(notice.strip().splitlines()) == 1
    assert from_old.model_dump() == load_recipe(write(tmp_path, new)).model_dump()
    assert from_old.precision_policy().frozen_base == "bf16"

    old["precision"] = {"frozen_base": "fp16"}
    assert "disagree" in error_of(tmp_path, old)
    del new["adapter"]
    assert "frozen_base bf16 applies to the frozen base under adapters" in error_of(tmp_path, new)


def test_precision_policy_reaches_the_sweep_after_training(monkeypatch, tmp_path):
    """The post-training ICL sweep scores under the autocast the run trained with."""
    from mamba_ft.evaluation import result as result_mod
    from mamba_ft.evaluation import sweep
    from mamba_ft.training import finish

    seen = {}

    def fake_sweep(models, **kwargs):
        seen.update(kwargs)
        return result_mod.SweepResult(models={}, tasks={}, shots=[], seeds=[], limit=None, baseline=None,
                                      scores=[], gains={"fine-tuned": {"mean": 0.0, "std": 0.0}})

    monkeypatch.setattr(sweep, "run_icl_sweep", fake_sweep)
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    data["precision"] = {"mode": "bf16"}
    data["evaluation"] = {"icl_sweep": {"shots": [0]}}
    recipe = load_recipe(write(tmp_path, data))
    finish.icl_sweep(recipe, model=None, tokenizer=None, out=tmp_path)
    assert seen["autocast"] == "bfloat16" and seen["dtype"] == "float32"
