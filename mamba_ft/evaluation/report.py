"""The written form of an ICL sweep: results.json, a markdown report and two PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mamba_ft.evaluation.result import SweepResult


def write_report(result: SweepResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    (out / "results.md").write_text(markdown_report(result))
    plot_accuracy_vs_shots(result, out / "accuracy_vs_shots.png")
    plot_gains(result, out / "icl_gain.png")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _family(result: SweepResult, label: str) -> str:
    return "Mamba" if result.models[label]["is_mamba"] else "Transformer"


def summary_table(result: SweepResult) -> str:
    """Per model: family, ICL gain (points, mean ± std over seeds) and its 95% interval, ratio
    to the baseline and its 95% interval ("unbounded" where the baseline's gain interval holds 0)."""
    lines = ["| model | family | ICL gain (points) | gain 95% interval | ratio to baseline | ratio 95% interval |",
             "|---|---|---|---|---|---|"]
    for label, gain in result.gains.items():
        ratio_ci = "–"
        if label == result.baseline:
            ratio = ratio_ci = "baseline"
        elif label in result.ratios:
            r = result.ratios[label]
            ratio = f"{_pct(r['ratio'])}%" if r["ratio"] is not None else "n/a (baseline gain is 0)"
            if len(result.seeds) > 1 and r["min"] is not None:
                ratio += f" (seeds: {_pct(r['min'])}–{_pct(r['max'])}%)"
            if r["ci"] is not None:
                ratio_ci = f"[{_pct(r['ci'][0])}%, {_pct(r['ci'][1])}%]"
            elif r["ci_unbounded"]:
                ratio_ci = "unbounded"
        else:
            ratio = "–"
        gain_ci = "–" if gain["ci"] is None else f"[{100 * gain['ci'][0]:+.1f}, {100 * gain['ci'][1]:+.1f}]"
        lines.append(f"| {label} | {_family(result, label)} | {100 * gain['mean']:+.1f} ± "
                     f"{100 * gain['std']:.1f} | {gain_ci} | {ratio} | {ratio_ci} |")
    return "\n".join(lines) + "\n"


def task_table(result: SweepResult) -> str:
    """Score (%) per task, model and shot count: mean ± std over few-shot seeds, and the
    mean's standard error over documents [se ...] where lm-eval gave one."""
    header = "| task (metric) | model | " + " | ".join(f"{k}-shot" for k in result.shots) + " |"
    lines = [header, "|---|---|" + "---|" * len(result.shots)]
    for task, metric in result.tasks.items():
        for label in result.models:
            cells = []
            for k in result.shots:
                mean, std = result.accuracy(label, task, k)
                se = result.accuracy_se(label, task, k)
                cells.append(f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if k and len(result.seeds) > 1 else "")
                             + (f" [se {100 * se:.1f}]" if se is not None else ""))
            lines.append(f"| {task} ({metric}) | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(result: SweepResult) -> str:
    models = ", ".join(f"{label} ({_family(result, label)}: {info['source']}"
                       + (f" + adapter {info['adapter']}" if info["adapter"] else "") + ")"
                       for label, info in result.models.items())
    limit = f"limit {result.limit} documents per task" if result.limit else "all documents"
    parts = [
        "# Few-shot ICL sweep\n",
        f"Models: {models}. Shots: {', '.join(map(str, result.shots))}; few-shot seeds: "
        f"{', '.join(map(str, result.seeds))} (0 shots draws no examples and runs once); {limit}.\n",
        "## ICL gain\n",
        summary_table(result),
        "ICL gain = mean over tasks and over k > 0 of (score at k shots − score at 0 shots), in "
        "percentage points, computed per few-shot seed; ± is the standard deviation over seeds. "
        + (f"Ratio = gain(model) / gain({result.baseline}) from the seed-mean gains; the range is "
           f"that of the per-seed ratios.\n" if result.baseline else "No baseline, so no ratio.\n"),
        _interval_note(result),
        "## Score by task and shots (%)\n",
        task_table(result),
        "![accuracy against shots](accuracy_vs_shots.png)\n\n![ICL gain](icl_gain.png)\n",
    ]
    return "\n".join(parts)


def _interval_note(result: SweepResult) -> str:
    if result.bootstrap_iters:
        sources = (f"lm-eval's standard errors of the scores (bootstrap_iters {result.bootstrap_iters}; "
                   f"the [se ...] below)")
        if len(result.seeds) > 1:
            sources += " and the spread over few-shot seeds"
    elif len(result.seeds) > 1:
        sources = "the spread over few-shot seeds only (lm-eval's standard errors were off: bootstrap_iters 0)"
    else:
        return "No intervals: lm-eval's standard errors were off (bootstrap_iters 0) and there is one seed.\n"
    return (f"95% intervals (normal approximation) hold {sources}; the ratio's is Fieller's, "
            f"unbounded when the baseline's gain interval contains 0. Scores are taken as "
            f"independent (docs/icl.md, \"Intervals\").\n")


def plot_accuracy_vs_shots(result: SweepResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(result.tasks) + ["mean over tasks"]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for ax, panel in zip(axes.flat, panels):
        for label in result.models:
            means, stds = [], []
            for k in result.shots:
                if panel in result.tasks:
                    mean, std = result.accuracy(label, panel, k)
                else:
                    # The mean over tasks, per seed first, so its spread is over seeds too.
                    per_seed = [statistics.fmean(result.score(label, t, k, s) for t in result.tasks)
                                for s in (result.seeds if k else result.seeds[:1])]
                    mean = statistics.fmean(per_seed)
                    std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
                means.append(100 * mean)
                stds.append(100 * std)
            ax.errorbar(result.shots, means, yerr=stds, marker="o", capsize=3, label=label)
        metric = result.tasks.get(panel, "")
        ax.set_title(f"{panel}" + (f" ({metric})" if metric else ""), fontsize=9)
        ax.set_xticks(result.shots)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("shots")
    for ax in axes[:, 0]:
        ax.set_ylabel("score (%)")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_gains(result: SweepResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result.gains)
    means = [100 * result.gains[label]["mean"] for label in labels]
    # Bars: the 95% interval where there is one (every model has one or none), else the std over seeds.
    with_ci = all(result.gains[label]["ci"] is not None for label in labels)
    errors = [100 * (result.gains[label]["ci"][1] - result.gains[label]["mean"] if with_ci
                     else result.gains[label]["std"]) for label in labels]
    colors = ["tab:green" if result.models[label]["is_mamba"] else "tab:blue" for label in labels]
    fig, ax = plt.subplots(figsize=(max(3.6, 1.2 + 1.3 * len(labels)), 3.0))
    bars = ax.bar(labels, means, yerr=errors, capsize=4, color=colors)
    for bar, label in zip(bars, labels):
        ratio = result.ratios.get(label, {}).get("ratio")
        if ratio is not None:
            ax.annotate(f"{100 * ratio:.0f}% of {result.baseline}", (bar.get_x() + bar.get_width() / 2, 0),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("ICL gain (points)")
    bars_are = "95% interval" if with_ci else "std over seeds"
    ax.set_title(f"few-shot gain over 0 shots, bars: {bars_are}\n(green: Mamba, blue: Transformer)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
