"""Tables and summary of a synthetic run, from hand-built results dicts (exact strings):
in-range and out-of-range lengths apart, several training seeds as mean ± a t-interval."""

from __future__ import annotations

import math
import statistics

import pytest

from mamba_ft.synthetic.report import results_markdown, summary_markdown, write_report
from mamba_ft.synthetic.stats import seed_interval, t_quantile


def _score(em, tok):
    return {"exact_match": em, "token_accuracy": tok, "answer_accuracy": em, "examples": 10}


def _run(task, model, family, d_state, ems, lengths=(4, 8), seed=None):
    run = {"variant": task, "model": model, "family": family, "params": 12345, "d_model": 32,
           "d_state": d_state, "train_seconds": 7.0,
           "results": [{"length": n, "greedy": _score(e, 0.9), "teacher_forced": _score(e, 0.95)}
                       for n, e in zip(lengths, ems)]}
    if seed is not None:
        run["seed"] = seed
    return run


def _results(task="copy", runs=None, train_lengths=(1, 4)):
    return {"name": "demo", "device": "cpu", "torch": "x", "seconds": 12.0,
            "spec": {"task": task, "train_lengths": list(train_lengths), "n_train": 100, "n_test": 10,
                     "training": {"steps": 5, "batch_size": 2}, "decoding": ["teacher_forced", "greedy"]},
            "runs": runs or [_run(task, "mamba-a", "mamba", 4, (1.0, 0.25)),
                             _run(task, "mamba-b", "mamba", 16, (0.75, 0.5)),
                             _run(task, "llama-c", "llama", None, (1.0, 1.0))]}


def _summary_line(results):
    return next(line for line in summary_markdown([results]).splitlines() if line.startswith("| demo"))


def test_table_rows_and_training_range_marks():
    text = results_markdown(_results())
    assert "| model | params | d_state | train s | 4* | 8 |" in text
    assert "| mamba-a | 12,345 | 4 | 7 | 1.00 | 0.25 |" in text
    assert "| llama-c | 12,345 | – | 7 | 1.00 | 1.00 |" in text
    assert "final-answer accuracy" not in text  # only CoT tasks get that table
    assert "seeds" not in text  # one seed per model: the tables look as they always did


def test_ranges_are_reported_apart_never_averaged_together():
    # Lengths 2 and 4 inside [1, 4], 8 and 16 outside; mamba-a: in (1.0 + 0.5)/2, out (0.25 + 0)/2.
    runs = [_run("copy", "mamba-a", "mamba", 4, (1.0, 0.5, 0.25, 0.0), lengths=(2, 4, 8, 16)),
            _run("copy", "mamba-b", "mamba", 16, (0.5, 0.5, 0.5, 0.5), lengths=(2, 4, 8, 16)),
            _run("copy", "llama-c", "llama", None, (1.0, 1.0, 0.0, 0.0), lengths=(2, 4, 8, 16))]
    results = _results(runs=runs)
    text = results_markdown(results)
    assert "| model | in range (2, 4) | out of range (8, 16) |" in text
    assert "| mamba-a | 0.75 | 0.12 |" in text  # 0.125 rounds half to even
    assert "| llama-c | 1.00 | 0.00 |" in text
    # The best Mamba is the best in range (mamba-a, 0.75), not the best over all lengths
    # (mamba-b: 0.5 against mamba-a's 0.4375); gaps Transformer − Mamba per range.
    line = _summary_line(results)
    assert "| mamba-a | 0.75 | 1.00 | +0.25 | 0.12 | 0.00 | -0.12 | 1 |" in line
    # No number in the summary is a mean across both ranges (0.44 for mamba-a, 0.50 for llama-c).
    assert "0.44" not in line and "0.50" not in line


def test_a_run_with_no_lengths_out_of_range_says_so():
    results = _results(train_lengths=(1, 8))
    assert "| model | in range (4, 8) | out of range (none) |" in results_markdown(results)
    assert "| mamba-a | 0.62 | 1.00 | +0.38 | – | – | – |" in _summary_line(results)


def test_mqar_headline_is_values_recalled():
    line = _summary_line(_results("mqar"))
    assert "values recalled (greedy)" in line and "| 0.90 | 0.90 | +0.00 | 0.90 | 0.90 | +0.00 |" in line


def test_several_seeds_give_mean_and_t_interval(tmp_path):
    # Three seeds per model at lengths 4 (in range) and 8 (out of range).
    mamba = {0: (0.9, 0.1), 1: (0.8, 0.3), 2: (0.6, 0.2)}
    llama = {0: (1.0, 0.4), 1: (0.95, 0.5), 2: (0.9, 0.3)}
    runs = [_run("copy", "mamba-a", "mamba", 4, ems, seed=s) for s, ems in mamba.items()]
    runs += [_run("copy", "llama-c", "llama", None, ems, seed=s) for s, ems in llama.items()]
    results = _results(runs=runs)
    # Student's t with 2 degrees of freedom has the closed-form quantile (2p−1)/sqrt(2p(1−p)).
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)

    def cell(values):
        return f"{statistics.fmean(values):.2f} ± {t2 * statistics.stdev(values) / math.sqrt(3):.2f}"

    text = results_markdown(results)
    assert "mean over 3 training seeds ± 95% t-interval" in text
    assert f"| mamba-a | 12,345 | 4 | 7 | {cell([0.9, 0.8, 0.6])} | {cell([0.1, 0.3, 0.2])} |" in text
    assert f"| llama-c | 12,345 | – | 7 | {cell([1.0, 0.95, 0.9])} | {cell([0.4, 0.5, 0.3])} |" in text
    # The gap is paired by seed: Transformer − Mamba per seed, then its mean and t-interval.
    gap_in = [llama[s][0] - mamba[s][0] for s in mamba]
    half = t2 * statistics.stdev(gap_in) / math.sqrt(3)
    line = _summary_line(results)
    assert f"| {cell([0.9, 0.8, 0.6])} | {cell([1.0, 0.95, 0.9])} | +{statistics.fmean(gap_in):.2f} ± {half:.2f} |" in line
    assert line.endswith("| 3 | cpu | 12 |")
    write_report(results, tmp_path)  # the plots draw seed error bars
    assert (tmp_path / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"


def test_t_quantile_against_closed_forms_and_scipy():
    # df 1 is the Cauchy distribution: tan(π(p − 1/2)); df 2 has (2p−1)/sqrt(2p(1−p)).
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)
    # Many degrees of freedom: close to the normal 1.95996 (t_1000 = 1.96234 to 5 figures).
    assert t_quantile(0.975, 1000) == pytest.approx(1.96234, abs=1e-5)
    stats = pytest.importorskip("scipy.stats")
    for df in (3, 4, 9, 29):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
    assert seed_interval([0.5]) == (0.5, None)


def test_write_report_files(tmp_path):
    write_report(_results(), tmp_path)
    assert (tmp_path / "results.md").read_text().startswith("# Synthetic run `demo`")
    for png in ("accuracy_vs_length.png", "accuracy_vs_state.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
