"""The two state-size designs (Ren et al.: a constant state cannot COPY, a state linear in the
length can): length-scaled Mambas over a sweep of longest training lengths, and the information
an example carries set against the state. Spec checks, the plan's d_state per length (the
expected values written out by hand), the information content by brute force, and a tiny run
of each CPU recipe (a few steps: which fields are written, not what is learnt)."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from mamba_ft.cli import main
from mamba_ft.synthetic.plan import plan_models
from mamba_ft.synthetic.report import results_markdown
from mamba_ft.synthetic.spec import load_spec
from mamba_ft.synthetic.tasks import make_task

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "synthetic"
SCALING_RECIPE = str(RECIPES / "copy_state_scaling_cpu.yaml")
BOUND_RECIPE = str(RECIPES / "copy_state_bound_cpu.yaml")


@pytest.mark.parametrize("overrides,message", [
    (["models.mamba.d_state_per_length=0"], "'models.mamba.d_state_per_length' in the defaults of task 'copy': "
                                            "must be a list of distinct positive numbers"),
    (["models.mamba.d_state_per_length=[-0.5]"], "distinct positive numbers"),
    (["models.mamba.d_state_per_length=[0.5,0.5]"], "distinct positive numbers"),
    (["models.mamba.d_state_per_length=.nan"], "distinct positive numbers"),
    (["models.mamba.d_state_per_length=half"], "'models.mamba.d_state_per_length"),
    (["models.mamba.d_state_per_length=200"], "d_state_per_length 200.0 gives d_state 2000 at training length 10, "
                                              "above the largest Mamba state 1024"),
    (["models.mamba.d_state=[]"], "it may be [] only beside d_state_per_length"),
    (["models.mamba.d_state=[]", "models.mamba.d_state_per_length=0.5"], "set models.transformer.match_d_state"),
    (["train_max_lengths=[4,8]"], "train_max_lengths [4, 8] must be distinct longest training lengths, each in "
                                  "train_lengths [1, 10], the largest equal to 10"),
    (["train_max_lengths=[]"], "must be distinct longest training lengths"),
    (["train_max_lengths=[10,10]"], "must be distinct longest training lengths"),
    (["train_max_lengths=[0,10]"], "must be distinct longest training lengths"),
    (["train_max_length=[5,10]"], "Did you mean 'train_max_lengths'?"),
])
def test_bad_state_settings_are_one_clear_error(overrides, message, capsys, tmp_path):
    argv = ["synth", "copy"] + [arg for item in overrides for arg in ("--set", item)]
    assert main(argv + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one line: the problem and what to change
    assert not (tmp_path / "x").exists()


def test_the_plan_sets_d_state_from_the_longest_training_length():
    spec = load_spec("copy", ["train_lengths=[1,30]", "train_max_lengths=[4,7,16,30]", "test_lengths=[4,40]",
                              "models.mamba.d_model=[16]", "models.mamba.n_layer=3", "models.mamba.expand=2",
                              "models.mamba.d_state=[2]", "models.mamba.d_state_per_length=[0.5,0.1]"])
    task = spec.tasks()[0][1]
    # ceil(k x L), written out: 0.5 x 7 = 3.5 -> 4; 0.1 x 4 = 0.4 -> 1; 0.1 x 30 = 3 exactly (the
    # float product is 3.0000000000000004, which a bare ceil would take to 4).
    expected = {4: (2, 1), 7: (4, 1), 16: (8, 2), 30: (15, 3)}
    transformers = set()
    for longest, (half, tenth) in expected.items():
        plans = {p.name: p for p in plan_models(spec, task, 64, longest)}
        assert list(plans) == ["mamba-d16-N2", "mamba-d16-N0.5xL", "mamba-d16-N0.1xL", "llama-d16"]
        for name, d_state, k in (("mamba-d16-N2", 2, None), ("mamba-d16-N0.5xL", half, 0.5), ("mamba-d16-N0.1xL", tenth, 0.1)):
            plan = plans[name]
            assert (plan.d_state, plan.config["state_size"], plan.d_state_per_length) == (d_state, d_state, k)
            assert plan.state_floats == 3 * 2 * 16 * d_state  # n_layer x expand x d_model x d_state
        transformers.add(json.dumps(plans["llama-d16"].config, sort_keys=True))
    assert len(transformers) == 1  # the Transformer does not change with L
    # Without a sweep, the scaled Mamba takes its state from train_lengths[1].
    spec = load_spec("copy", ["models.mamba.d_state_per_length=0.5"])  # train_lengths [1, 10]
    assert [p.d_state for p in plan_models(spec, task, 64) if p.family == "mamba"] == [16, 5]


class _Enumerate:
    """A stand-in for random.Random whose `choices` returns the given strings one after another."""

    def __init__(self, strings):
        self.strings = iter(strings)

    def choices(self, population, k):
        chosen = next(self.strings)
        assert len(chosen) == k and set(chosen) <= set(population)
        return list(chosen)


@pytest.mark.parametrize("alphabet,length", [(2, 4), (3, 3), (5, 2)])
def test_copy_information_by_brute_force(alphabet, length):
    task = make_task("copy", alphabet=alphabet)
    letters = "abcdefghijklmnopqrstuvwxyz"[:alphabet]
    # The sampler draws each string with probability alphabet^-length (rng.choices is uniform):
    # enumerate every draw, build its example, and take the entropy of the answers.
    everything = list(itertools.product(letters, repeat=length))
    rng = _Enumerate(everything)
    answers = Counter(task.sample(rng, length).answer for _ in everything)
    entropy = -sum(c / len(everything) * math.log2(c / len(everything)) for c in answers.values())
    assert len(answers) == alphabet ** length  # distinct strings give distinct answers
    assert task.information_bits(length) == pytest.approx(entropy, abs=1e-12)
    # The numbers a reader sees: 4 bits, 3 log2 3 = 4.755, 2 log2 5 = 4.644.
    assert round(task.information_bits(length), 3) == {(2, 4): 4.0, (3, 3): 4.755, (5, 2): 4.644}[(alphabet, length)]


def test_information_is_only_claimed_where_defined():
    assert make_task("copy", alphabet=26).information_bits(10) == pytest.approx(47.004, abs=1e-3)
    for name in ("prefix_ngram", "suffix_ngram", "mqar", "arithmetic"):
        assert make_task(name).information_bits(8) is None


def _tiny(recipe, out, *extra):
    args = ["synth", recipe, "--out", str(out), "--set", "training.steps=3", "--set", "training.warmup_steps=1",
            "--set", "n_train=64", "--set", "n_test=3", "--set", "decoding=[teacher_forced]", *extra]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


def test_length_scaled_recipe_end_to_end(tmp_path):
    spec = load_spec(SCALING_RECIPE)
    maxima = spec.train_max_lengths
    assert spec.models.mamba.d_state_per_length and len(maxima) >= 3 and len(spec.training_seeds()) >= 2
    assert set(maxima) <= set(spec.test_lengths)  # each L is scored at L
    out = tmp_path / "scaling"
    results = _tiny(SCALING_RECIPE, out, "--set", "training.seeds=[0]")
    [k] = spec.models.mamba.d_state_per_length
    lo = spec.train_lengths[0]
    scaled = f"mamba-d{spec.models.mamba.d_model[0]}-N{k:g}xL"
    by_group = {}
    for run in results["runs"]:
        by_group.setdefault(run["variant"], {})[run["model"]] = run
    assert list(by_group) == [f"train_max={L}" for L in maxima]
    for L in maxima:
        runs = by_group[f"train_max={L}"]
        assert {r["train_lengths"][1] for r in runs.values()} == {L} and runs[scaled]["train_lengths"] == [lo, L]
        assert runs[scaled]["d_state"] == math.ceil(k * L) and runs[scaled]["d_state_per_length"] == k
        assert all(r["d_state_per_length"] is None for name, r in runs.items() if name != scaled)
    # Every group was scored on the same test sets.
    assert len({json.dumps(sizes) for sizes in results["test_set_sizes"].values()}) == 1
    text = (out / "results.md").read_text()
    assert "## copy: the longest training length L against the state" in text
    assert f"(N {math.ceil(k * maxima[0])})" in text
    # In-range marks follow each group's own L: the smallest L's group has L* and the next L unmarked.
    assert f"## train_max={maxima[0]}" in text
    group_table = text.split(f"## train_max={maxima[0]}")[1]
    assert f"| {maxima[0]}* | {maxima[1]} |" in group_table
    assert f"| {maxima[1]}* |" in text.split(f"## train_max={maxima[1]}")[1]
    assert (out / "accuracy_vs_max_length.png").read_bytes()[:4] == b"\x89PNG"


def test_state_bound_recipe_reports_information_beside_state(tmp_path):
    spec = load_spec(BOUND_RECIPE)
    assert len(spec.models.mamba.d_state) >= 3 and len(spec.training_seeds()) >= 2
    alphabet = spec.task_args["alphabet"]
    out = tmp_path / "bound"
    results = _tiny(BOUND_RECIPE, out, "--set", "training.seeds=[0]", "--set", "models.mamba.d_state=[1,4]")
    mamba = spec.models.mamba
    for run in results["runs"]:
        assert [row["information_bits"] for row in run["results"]] == \
            [round(n * math.log2(alphabet), 3) for n in spec.test_lengths]
        if run["family"] == "mamba":
            assert run["state_floats"] == mamba.n_layer * mamba.expand * mamba.d_model[0] * run["d_state"]
    text = results_markdown(results)
    assert "Information per example" in text
    n = spec.test_lengths[-1]
    d1 = mamba.n_layer * mamba.expand * mamba.d_model[0]
    assert f"| mamba-d{mamba.d_model[0]}-N1 | 1 | {d1:,} |" in text
    assert f"{n * math.log2(alphabet) / d1:.2f} |" in text.split(f"mamba-d{mamba.d_model[0]}-N1 | 1 |")[1].splitlines()[0]


def test_report_measures_each_range_from_its_own_longest_length():
    # Hand-built: groups L = 4 and L = 8, tested at 4 and 8. Length 8 is out of range for the
    # L = 4 group and in range for the L = 8 group; the max-length table reads each group at L.
    def run(variant, hi, model, d_state, per_length, ems):
        rows = [{"length": n, "information_bits": 4.0 * n,
                 "greedy": {"exact_match": e, "token_accuracy": e, "answer_accuracy": e, "examples": 4}}
                for n, e in zip((4, 8), ems)]
        floats = 128 * d_state if d_state else None
        return {"variant": variant, "task_variant": "copy", "train_lengths": [1, hi], "model": model, "seed": 0,
                "family": "mamba" if d_state else "llama", "params": 100, "d_model": 32, "d_state": d_state,
                "state_floats": floats, "d_state_per_length": per_length, "train_seconds": 1.0, "results": rows}

    results = {"name": "demo", "device": "cpu", "torch": "x", "seconds": 3.0,
               "spec": {"task": "copy", "train_lengths": [1, 8], "train_max_lengths": [4, 8], "n_train": 10,
                        "n_test": 4, "training": {"steps": 1, "batch_size": 1}, "decoding": ["greedy"]},
               "runs": [run("train_max=4", 4, "mamba-d32-N1", 1, None, (0.5, 0.0)),
                        run("train_max=4", 4, "mamba-d32-N1xL", 4, 1.0, (1.0, 0.25)),
                        run("train_max=8", 8, "mamba-d32-N1", 1, None, (0.75, 0.0)),
                        run("train_max=8", 8, "mamba-d32-N1xL", 8, 1.0, (1.0, 0.75)),
                        run("train_max=8", 8, "llama-d8", None, None, (1.0, 1.0))]}
    text = results_markdown(results)
    assert "| L | information at L (bits) | mamba-d32-N1 | mamba-d32-N1xL | llama-d8 |" in text
    assert "| 4 | 16.0 | 0.50 (N 1) | 1.00 (N 4) | – |" in text
    assert "| 8 | 32.0 | 0.00 (N 1) | 0.75 (N 8) | 1.00 |" in text
    small, large = text.split("## train_max=4")[1].split("## train_max=8")
    assert "| model | in range (4) | out of range (8) |" in small and "| mamba-d32-N1xL | 1.00 | 0.25 |" in small
    assert "| model | in range (4, 8) | out of range (none) |" in large and "| mamba-d32-N1xL | 0.88 | – |" in large
    # Bits per state float: 16 and 32 bits over 128 x d_state floats.
    assert "| mamba-d32-N1 | 1 | 128 | 0.12 | 0.25 |" in small
    assert "| mamba-d32-N1xL | 8 | 1,024 | 0.02 | 0.03 |" in large
    assert "| information (bits) | | | 16.0 | 32.0 |" in large
