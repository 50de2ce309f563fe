"""Tables and plots from a synthetic run's results (the dict written to results.json).

- results.md:        per task variant, one table per metric: rows are models, columns test
                     lengths (a * marks lengths inside the training range).
- accuracy_vs_length.png: the task's headline metric (see `headline`) and teacher-forced token
                     accuracy against test length, one line per model.
- accuracy_vs_state.png:  the headline metric, averaged over the test lengths, against Mamba
                     d_state, one line per width, the matched Transformer as a dashed level.
- summary.md (several runs): the headline numbers of every run side by side.
"""

from __future__ import annotations

import math
from pathlib import Path

# (decoding, metric, title) in table order; answer accuracy only where it differs (CoT).
_TABLES = [("greedy", "exact_match", "string exact match, greedy generation"),
           ("teacher_forced", "exact_match", "string exact match, teacher-forced"),
           ("greedy", "token_accuracy", "per-token accuracy, greedy generation"),
           ("teacher_forced", "token_accuracy", "per-token accuracy, teacher-forced"),
           ("greedy", "answer_accuracy", "final-answer accuracy, greedy generation (CoT scored by its result)")]


def headline(results: dict) -> tuple[str, str, str]:
    """(decoding, metric, label) of the one number per test length that plots and summaries show:
    string exact match for copying, the fraction of values recalled for MQAR (Zoology's
    metric), the final answer for CoT/DP tasks (Feng et al.'s)."""
    task = results["spec"]["task"]
    decoding = "greedy" if "greedy" in results["spec"]["decoding"] else "teacher_forced"
    if task == "mqar":
        return decoding, "token_accuracy", f"values recalled ({decoding})"
    if task in ("arithmetic", "lis"):
        return decoding, "answer_accuracy", f"final answer right ({decoding})"
    return decoding, "exact_match", f"string exact match ({decoding})"


def _variants(results: dict) -> list[str]:
    return list(dict.fromkeys(run["variant"] for run in results["runs"]))


def _metric(row: dict, decoding: str, metric: str) -> float | None:
    return row.get(decoding, {}).get(metric)


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def mean_metric(run: dict, decoding: str, metric: str) -> float | None:
    values = [_metric(r, decoding, metric) for r in run["results"]]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def results_markdown(results: dict) -> str:
    spec = results["spec"]
    lo, hi = spec["train_lengths"]
    lines = [f"# Synthetic run `{results['name']}`: task `{spec['task']}`", "",
             f"Device: {results['device']}; torch {results['torch']}; total {results['seconds']:.0f} s. "
             f"Trained on lengths {lo}–{hi} ({spec['n_train']} examples, {spec['training']['steps']} steps "
             f"of batch {spec['training']['batch_size']}); {spec['n_test']} test examples per length "
             f"(fewer where the task has fewer distinct prompts: see results.json).", ""]
    decodings = set(spec["decoding"])
    cot_like = spec["task"] in ("arithmetic", "lis")
    for variant in _variants(results):
        runs = [r for r in results["runs"] if r["variant"] == variant]
        lengths = [row["length"] for row in runs[0]["results"]]
        head = [f"{n}{'*' if lo <= n <= hi else ''}" for n in lengths]
        lines += [f"## {variant}", ""]
        for decoding, metric, title in _TABLES:
            if decoding not in decodings or (metric == "answer_accuracy" and not cot_like):
                continue
            lines += [f"{title} (* = inside the training range)", "",
                      "| model | params | d_state | train s | " + " | ".join(head) + " |",
                      "|---|---:|---:|---:|" + "---:|" * len(lengths)]
            for run in runs:
                cells = [_fmt(_metric(row, decoding, metric)) for row in run["results"]]
                lines.append(f"| {run['model']} | {run['params']:,} | {run['d_state'] or '–'} | "
                             f"{run.get('train_seconds', 0):.0f} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def summary_markdown(all_results: list[dict]) -> str:
    """Mean over test lengths, per run and variant: the best Mamba against the best Transformer."""
    lines = ["# Synthetic suite summary", "",
             "Headline metric per task, averaged over its test lengths: string exact match (copy, "
             "n-gram lookup), fraction of values recalled (mqar), final-answer accuracy (arithmetic, "
             "lis), all by greedy generation. Gap = Transformer minus best Mamba.", "",
             "| run | variant | metric | best Mamba | Mamba | Transformer | gap | device | seconds |",
             "|---|---|---|---|---:|---:|---:|---|---:|"]
    for results in all_results:
        decoding, metric, label = headline(results)
        for variant in _variants(results):
            runs = [r for r in results["runs"] if r["variant"] == variant]

            def value(run):
                return mean_metric(run, decoding, metric) or 0.0

            mambas = [r for r in runs if r["family"] == "mamba"]
            tfs = [r for r in runs if r["family"] != "mamba"]
            best = max(mambas, key=value) if mambas else None
            tf = max(tfs, key=value) if tfs else None
            gap = f"{value(tf) - value(best):+.2f}" if best and tf else "–"
            lines.append(f"| {results['name']} | {variant} | {label} | {best['model'] if best else '–'} | "
                         f"{_fmt(value(best)) if best else '–'} | {_fmt(value(tf)) if tf else '–'} | {gap} | "
                         f"{results['device']} | {results['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_length(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _variants(results)
    hi = results["spec"]["train_lengths"][1]
    decoding, metric, label = headline(results)
    fig, axes = plt.subplots(2, len(variants), figsize=(4.2 * len(variants), 6), squeeze=False)
    for col, variant in enumerate(variants):
        for run in (r for r in results["runs"] if r["variant"] == variant):
            lengths = [row["length"] for row in run["results"]]
            style = "-o" if run["family"] == "mamba" else "--s"
            for row_i, (dec, met) in enumerate(((decoding, metric), ("teacher_forced", "token_accuracy"))):
                ys = [_metric(row, dec, met) for row in run["results"]]
                if all(y is None for y in ys):
                    continue
                axes[row_i][col].plot(lengths, ys, style, label=f"{run['model']} ({run['params'] / 1e3:.0f}k)", markersize=4)
        for row_i, ylabel in enumerate((label, "token accuracy (teacher-forced)")):
            ax = axes[row_i][col]
            ax.axvline(hi, color="grey", linestyle=":", linewidth=1)
            ax.set_ylim(-0.03, 1.03)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel(f"test length (dotted: longest trained, {hi})")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{results['spec']['task']}: {variant}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_accuracy_vs_state(results: dict, path: Path) -> bool:
    """Returns False (and writes nothing) when the run swept a single d_state."""
    states = {r["d_state"] for r in results["runs"] if r["family"] == "mamba"}
    if len(states) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _variants(results)
    decoding, metric, label = headline(results)
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.4), squeeze=False)
    for col, variant in enumerate(variants):
        ax = axes[0][col]
        runs = [r for r in results["runs"] if r["variant"] == variant]
        for width in sorted({r["d_model"] for r in runs if r["family"] == "mamba"}):
            line = sorted((r for r in runs if r["family"] == "mamba" and r["d_model"] == width), key=lambda r: r["d_state"])
            ax.plot([r["d_state"] for r in line], [mean_metric(r, decoding, metric) for r in line], "-o",
                    label=f"Mamba d_model {width}", markersize=4)
        for run in (r for r in runs if r["family"] != "mamba"):
            ax.axhline(mean_metric(run, decoding, metric), linestyle="--", linewidth=1,
                       color="black", label=f"{run['model']} ({run['params'] / 1e3:.0f}k)")
        ax.set_xscale("log", base=2)
        states_here = sorted({r["d_state"] for r in runs if r["family"] == "mamba"})
        ax.set_xticks(states_here, [str(n) for n in states_here])
        ax.minorticks_off()
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("Mamba d_state")
        ax.set_ylabel(f"{label},\nmean over test lengths", fontsize=8)
        ax.set_title(f"{results['spec']['task']}: {variant}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_report(results: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    (out_dir / "results.md").write_text(results_markdown(results))
    plot_accuracy_vs_length(results, out_dir / "accuracy_vs_length.png")
    plot_accuracy_vs_state(results, out_dir / "accuracy_vs_state.png")
