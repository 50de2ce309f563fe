"""Tables and summary of a synthetic run, from a hand-built results dict (exact strings)."""

from __future__ import annotations

from mamba_ft.synthetic.report import results_markdown, summary_markdown, write_report


def _score(em, tok):
    return {"exact_match": em, "token_accuracy": tok, "answer_accuracy": em, "examples": 10}


def _results(task="copy"):
    def run(model, family, d_state, ems):
        return {"variant": task, "model": model, "family": family, "params": 12345, "d_model": 32,
                "d_state": d_state, "train_seconds": 7.0,
                "results": [{"length": n, "greedy": _score(e, 0.9), "teacher_forced": _score(e, 0.95)}
                            for n, e in zip((4, 8), ems)]}
    return {"name": "demo", "device": "cpu", "torch": "x", "seconds": 12.0,
            "spec": {"task": task, "train_lengths": [1, 4], "n_train": 100, "n_test": 10,
                     "training": {"steps": 5, "batch_size": 2}, "decoding": ["teacher_forced", "greedy"]},
            "runs": [run("mamba-a", "mamba", 4, (1.0, 0.25)), run("mamba-b", "mamba", 16, (1.0, 0.5)),
                     run("llama-c", "llama", None, (1.0, 1.0))]}


def test_table_rows_and_training_range_marks():
    text = results_markdown(_results())
    assert "| model | params | d_state | train s | 4* | 8 |" in text
    assert "| mamba-a | 12,345 | 4 | 7 | 1.00 | 0.25 |" in text
    assert "| llama-c | 12,345 | – | 7 | 1.00 | 1.00 |" in text
    assert "final-answer accuracy" not in text  # only CoT tasks get that table


def test_summary_picks_best_mamba_and_gap():
    # copy: headline is greedy exact match; means 0.625 / 0.75 / 1.0 -> best mamba-b, gap +0.25
    line = [l for l in summary_markdown([_results()]).splitlines() if l.startswith("| demo")][0]
    assert "| mamba-b | 0.75 | 1.00 | +0.25 |" in line
    # mqar: headline is the fraction of values recalled (token accuracy, greedy): all 0.90
    line = [l for l in summary_markdown([_results("mqar")]).splitlines() if l.startswith("| demo")][0]
    assert "| 0.90 | 0.90 | +0.00 |" in line


def test_write_report_files(tmp_path):
    write_report(_results(), tmp_path)
    assert (tmp_path / "results.md").read_text().startswith("# Synthetic run `demo`")
    for png in ("accuracy_vs_length.png", "accuracy_vs_state.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
