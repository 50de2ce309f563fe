"""Tables and plots from a synthetic run's results (the dict written to results.json).

Test lengths inside the training range and outside it are always reported apart: a mean over
lengths is taken within one range, never across both. A model trained with several seeds
(`training.seeds`) is one cell: its runs are shown as the mean over seeds ± the half-width of
a 95% Student-t interval (`stats.py`).

- results.md:        per task variant, one table per metric: rows are models, columns test
                     lengths (a * marks lengths inside the training range); then the headline
                     metric's mean within each range.
- accuracy_vs_length.png: the task's headline metric (see `headline`) and teacher-forced token
                     accuracy against test length, one line per model (error bars: seeds).
- accuracy_vs_state.png:  the headline metric, averaged over the in-range and, below, the
                     out-of-range test lengths, against Mamba d_state, one line per width, the
                     matched Transformer as a dashed level.
- summary.md (several runs): the headline numbers of every run side by side, per range.

Where the task defines it (COPY), results.md also sets the information an example carries
(bits) beside each Mamba's state (`state_floats`): bits per state float at every test length.
With `train_max_lengths` (one training range per longest length L; each range's own tables),
results.md adds the headline at test length L against L for every model, and
accuracy_vs_max_length.png draws it: the length-scaled Mambas (d_state ~ L) against the
constant-state ones and the Transformer.
"""

from __future__ import annotations

import math
from pathlib import Path

from mamba_ft.synthetic.stats import seed_interval

# (decoding, metric, title) in table order; answer accuracy only where it differs (CoT).
_TABLES = [("greedy", "exact_match", "string exact match, greedy generation"),
           ("teacher_forced", "exact_match", "string exact match, teacher-forced"),
           ("greedy", "token_accuracy", "per-token accuracy, greedy generation"),
           ("teacher_forced", "token_accuracy", "per-token accuracy, teacher-forced"),
           ("greedy", "answer_accuracy", "final-answer accuracy, greedy generation (CoT scored by its result)")]
RANGES = (("in range", True), ("out of range", False))


# The CoT/DP tasks, whose headline is the final answer (the chain of thought may differ).
FINAL_ANSWER_TASKS = ("arithmetic", "lis", "dp_local", "dp_nonlocal")


def headline(results: dict) -> tuple[str, str, str]:
    """(decoding, metric, label) of the one number per test length that plots and summaries show:
    string exact match for copying, the fraction of values recalled for MQAR (Zoology's
    metric), the final answer for CoT/DP tasks (Feng et al.'s)."""
    task = results["spec"]["task"]
    decoding = "greedy" if "greedy" in results["spec"]["decoding"] else "teacher_forced"
    if task in ("mqar", "mqar_zoology"):
        return decoding, "token_accuracy", f"values recalled ({decoding})"
    if task in FINAL_ANSWER_TASKS:
        return decoding, "answer_accuracy", f"final answer right ({decoding})"
    return decoding, "exact_match", f"string exact match ({decoding})"


def _variants(results: dict) -> list[str]:
    return list(dict.fromkeys(run["variant"] for run in results["runs"]))


def cells(results: dict, variant: str) -> dict[str, list[dict]]:
    """model -> its runs of `variant`, one per training seed, models in the order they ran."""
    out: dict[str, list[dict]] = {}
    for run in results["runs"]:
        if run["variant"] == variant:
            out.setdefault(run["model"], []).append(run)
    return out


def _metric(row: dict, decoding: str, metric: str) -> float | None:
    value = row.get(decoding, {}).get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def training_range(results: dict, run: dict | None = None) -> tuple[int, int]:
    """The run's training lengths [lo, hi] (its own with `train_max_lengths`; runs written
    before that existed have the spec's)."""
    lo, hi = (run or {}).get("train_lengths") or results["spec"]["train_lengths"]
    return lo, hi


def in_training_range(results: dict, length: int, run: dict | None = None) -> bool:
    lo, hi = training_range(results, run)
    return lo <= length <= hi


def range_mean(results: dict, run: dict, decoding: str, metric: str, inside: bool) -> float | None:
    """The run's mean over its test lengths inside (or outside) its training range."""
    values = [_metric(row, decoding, metric) for row in run["results"]
              if in_training_range(results, row["length"], run) == inside]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def over_seeds(runs: list[dict], value) -> tuple[float, float | None] | None:
    """(mean, 95% half-width or None) over a cell's seeds of `value(run)`; None if it has none."""
    values = [v for v in map(value, runs) if v is not None]
    return seed_interval(values) if values else None


def _fmt_seeds(summary: tuple[float, float | None] | None, signed: bool = False) -> str:
    if summary is None:
        return "–"
    mean, half = summary
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if half is None else f"{text} ± {half:.2f}"


def _seed_note(results: dict) -> str:
    counts = {len(runs) for variant in _variants(results) for runs in cells(results, variant).values()}
    if counts == {1}:
        return ""
    shown = "/".join(str(n) for n in sorted(counts))
    return f"; mean over {shown} training seeds ± 95% t-interval"


def results_markdown(results: dict) -> str:
    spec = results["spec"]
    lo, hi = spec["train_lengths"]
    maxima = spec.get("train_max_lengths")
    trained = (f"Trained on lengths {lo}–L for L in {', '.join(map(str, maxima))}, each L a group of its own"
               if maxima else f"Trained on lengths {lo}–{hi}")
    lines = [f"# Synthetic run `{results['name']}`: task `{spec['task']}`", "",
             f"Device: {results['device']}; torch {results['torch']}; total {results['seconds']:.0f} s. "
             f"{trained} ({spec['n_train']} examples, {spec['training']['steps']} steps "
             f"of batch {spec['training']['batch_size']}); {spec['n_test']} test examples per length "
             f"(fewer where the task has fewer distinct prompts: see results.json).", ""]
    decodings = set(spec["decoding"])
    cot_like = spec["task"] in FINAL_ANSWER_TASKS
    note = _seed_note(results)
    if maxima:
        lines += _max_length_tables(results)
    for variant in _variants(results):
        models = cells(results, variant)
        first = next(iter(models.values()))[0]
        lengths = [row["length"] for row in first["results"]]
        head = [f"{n}{'*' if in_training_range(results, n, first) else ''}" for n in lengths]
        lines += [f"## {variant}", ""]
        for decoding, metric, title in _TABLES:
            if decoding not in decodings or (metric == "answer_accuracy" and not cot_like):
                continue
            lines += [f"{title} (* = inside the training range{note})", "",
                      "| model | params | d_state | train s | " + " | ".join(head) + " |",
                      "|---|---:|---:|---:|" + "---:|" * len(lengths)]
            for model, runs in models.items():
                row_cells = [_fmt_seeds(over_seeds(runs, lambda run, i=i: _metric(run["results"][i], decoding, metric)))
                             for i in range(len(lengths))]
                seconds = sum(run.get("train_seconds", 0) for run in runs) / len(runs)
                lines.append(f"| {model} | {runs[0]['params']:,} | {runs[0]['d_state'] or '–'} | "
                             f"{seconds:.0f} | " + " | ".join(row_cells) + " |")
            lines.append("")
        lines += _range_table(results, models, lengths)
        lines += _information_table(results, models, lengths)
    return "\n".join(lines)


def _information_table(results: dict, models: dict[str, list[dict]], lengths: list[int]) -> list[str]:
    """Bits an example carries (where the task defines it) against each Mamba's state floats."""
    first = next(iter(models.values()))[0]
    bits = [row.get("information_bits") for row in first["results"]]
    if all(b is None for b in bits):
        return []
    head = [f"{n}{'*' if in_training_range(results, n, first) else ''}" for n in lengths]
    lines = ["Information per example (bits the answer needs from the prompt) and, per Mamba, bits per "
             "state float (information ÷ `state_floats`, the recurrent state's n_layer × expand × d_model "
             "× d_state numbers); where it is high, the state binds", "",
             "| | d_state | state floats | " + " | ".join(head) + " |",
             "|---|---:|---:|" + "---:|" * len(lengths),
             "| information (bits) | | | " + " | ".join("–" if b is None else f"{b:.1f}" for b in bits) + " |"]
    for model, runs in models.items():
        floats = runs[0].get("state_floats")
        if not floats:
            continue
        ratios = ["–" if b is None else f"{b / floats:.2f}" for b in bits]
        lines.append(f"| {model} | {runs[0]['d_state']} | {floats:,} | " + " | ".join(ratios) + " |")
    return lines + [""]


def _groups(results: dict) -> dict[str, dict[int, str]]:
    """task variant -> {longest training length L -> the variant label of that group}."""
    out: dict[str, dict[int, str]] = {}
    for run in results["runs"]:
        out.setdefault(run.get("task_variant", run["variant"]), {})[training_range(results, run)[1]] = run["variant"]
    return {task: dict(sorted(groups.items())) for task, groups in out.items()}


def _at_length(run: dict, length: int, decoding: str, metric: str) -> float | None:
    row = next((row for row in run["results"] if row["length"] == length), None)
    return None if row is None else _metric(row, decoding, metric)


def _max_length_tables(results: dict) -> list[str]:
    """Per task variant: rows L (the longest training length), per model the headline at test
    length L (the longest it was trained on; – where L is not a test length), and the state."""
    decoding, metric, label = headline(results)
    note = _seed_note(results)
    lines = []
    for task_variant, groups in _groups(results).items():
        models = list(dict.fromkeys(run["model"] for run in results["runs"]
                                    if run.get("task_variant", run["variant"]) == task_variant))
        lines += [f"## {task_variant}: the longest training length L against the state", "",
                  f"{label} at test length L, the longest each model was trained on{note}; the d_state "
                  f"of each Mamba in brackets (length-scaled Mambas, `N<k>xL`, have d_state ceil(k × L))", "",
                  "| L | information at L (bits) | " + " | ".join(models) + " |",
                  "|---:|---:|" + "---:|" * len(models)]
        for hi, variant in groups.items():
            here = cells(results, variant)
            some = next(iter(here.values()))[0]
            bits = next((row.get("information_bits") for row in some["results"] if row["length"] == hi), None)
            row = [str(hi), "–" if bits is None else f"{bits:.1f}"]
            for model in models:
                runs = here.get(model)
                if not runs:
                    row.append("–")
                    continue
                text = _fmt_seeds(over_seeds(runs, lambda run: _at_length(run, hi, decoding, metric)))
                row.append(text + (f" (N {runs[0]['d_state']})" if runs[0].get("d_state") else ""))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _range_table(results: dict, models: dict[str, list[dict]], lengths: list[int]) -> list[str]:
    """The headline metric's mean over the in-range and over the out-of-range test lengths."""
    decoding, metric, label = headline(results)
    first = next(iter(models.values()))[0]
    columns = []
    for name, inside in RANGES:
        shown = [n for n in lengths if in_training_range(results, n, first) == inside]
        columns.append((f"{name} ({', '.join(map(str, shown)) or 'none'})", inside))
    lines = [f"{label}, mean over the test lengths of each range{_seed_note(results)}", "",
             "| model | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for model, runs in models.items():
        values = [_fmt_seeds(over_seeds(runs, lambda run, inside=inside: range_mean(results, run, decoding, metric, inside)))
                  for _, inside in columns]
        lines.append(f"| {model} | " + " | ".join(values) + " |")
    return lines + [""]


def summary_markdown(all_results: list[dict]) -> str:
    """Per run and variant, for the in-range and the out-of-range test lengths apart: the best
    Mamba (by its in-range mean) against the best Transformer, and the gap between them."""
    lines = ["# Synthetic suite summary", "",
             "Headline metric per task, averaged over the test lengths inside the training range "
             "and, apart, over those outside it: string exact match (copy, n-gram lookup), "
             "fraction of values recalled (mqar, mqar_zoology), final-answer accuracy (arithmetic, "
             "lis, dp_local, dp_nonlocal), all by greedy generation. The best Mamba and Transformer are the best in "
             "range. Gap = Transformer minus best Mamba. With several training seeds: mean ± 95% "
             "t-interval over seeds (the gap's from the per-seed gaps).", "",
             "| run | variant | metric | best Mamba | Mamba in range | Transformer in range | gap in range "
             "| Mamba out of range | Transformer out of range | gap out of range | seeds | device | seconds |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for results in all_results:
        decoding, metric, label = headline(results)
        for variant in _variants(results):
            models = cells(results, variant)

            def score(runs, inside):
                return over_seeds(runs, lambda run: range_mean(results, run, decoding, metric, inside))

            def rank(item):  # the in-range mean picks the best; a cell without one ranks last
                summary = score(item[1], True) or score(item[1], False)
                return summary[0] if summary else -math.inf

            mambas = [item for item in models.items() if item[1][0]["family"] == "mamba"]
            tfs = [item for item in models.items() if item[1][0]["family"] != "mamba"]
            best = max(mambas, key=rank) if mambas else None
            tf = max(tfs, key=rank) if tfs else None
            row = [results["name"], variant, label, best[0] if best else "–"]
            for _, inside in RANGES:
                row += [_fmt_seeds(score(best[1], inside)) if best else "–",
                        _fmt_seeds(score(tf[1], inside)) if tf else "–",
                        _fmt_seeds(_gap(results, best, tf, decoding, metric, inside), signed=True)]
            seeds = sorted({len(runs) for _, runs in models.items()})
            row += ["/".join(map(str, seeds)), results["device"], f"{results['seconds']:.0f}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _gap(results, best, tf, decoding, metric, inside) -> tuple[float, float | None] | None:
    """Transformer minus Mamba: per seed when both cells ran the same seeds (paired), else the
    difference of their means."""
    if not best or not tf:
        return None

    def per_seed(runs):
        return {run.get("seed"): range_mean(results, run, decoding, metric, inside) for run in runs}

    mamba, other = per_seed(best[1]), per_seed(tf[1])
    if set(mamba) == set(other) and None not in mamba.values() and None not in other.values():
        return seed_interval([other[seed] - mamba[seed] for seed in mamba])
    a = over_seeds(best[1], lambda run: range_mean(results, run, decoding, metric, inside))
    b = over_seeds(tf[1], lambda run: range_mean(results, run, decoding, metric, inside))
    return (b[0] - a[0], None) if a and b else None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _finish_axes(ax, ticks, xlabel: str, ylabel: str, title: str, log2: bool = False,
                 legend: bool = True) -> None:
    """An accuracy panel's common dressing: 0-1 scale, one labelled tick per value, grid."""
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=6)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_accuracy_vs_length(results: dict, path: Path) -> None:
    plt = _pyplot()
    variants = _variants(results)
    decoding, metric, label = headline(results)
    fig, axes = plt.subplots(2, len(variants), figsize=(4.2 * len(variants), 6), squeeze=False)
    for col, variant in enumerate(variants):
        hi = training_range(results, next(iter(cells(results, variant).values()))[0])[1]
        for model, runs in cells(results, variant).items():
            lengths = [row["length"] for row in runs[0]["results"]]
            style = "-o" if runs[0]["family"] == "mamba" else "--s"
            for row_i, (dec, met) in enumerate(((decoding, metric), ("teacher_forced", "token_accuracy"))):
                points = [over_seeds(runs, lambda run, i=i: _metric(run["results"][i], dec, met))
                          for i in range(len(lengths))]
                if all(p is None for p in points):
                    continue
                ys = [p[0] if p else math.nan for p in points]
                errors = [(p[1] or 0.0) if p else 0.0 for p in points]
                axes[row_i][col].errorbar(lengths, ys, yerr=errors if any(errors) else None, fmt=style, capsize=2,
                                          label=f"{model} ({runs[0]['params'] / 1e3:.0f}k)", markersize=4)
        for row_i, ylabel in enumerate((label, "token accuracy (teacher-forced)")):
            ax = axes[row_i][col]
            ax.axvline(hi, color="grey", linestyle=":", linewidth=1)
            _finish_axes(ax, lengths, f"test length (dotted: longest trained, {hi})", ylabel,
                         f"{results['spec']['task']}: {variant}", log2=True, legend=row_i == 0)
    _save(plt, fig, path)


def plot_accuracy_vs_state(results: dict, path: Path) -> bool:
    """Returns False (and writes nothing) when the run swept a single d_state. Length-scaled
    Mambas are left out: their d_state follows the training length (accuracy_vs_max_length)."""
    states = {r["d_state"] for r in results["runs"] if r["family"] == "mamba" and not r.get("d_state_per_length")}
    if len(states) < 2:
        return False
    plt = _pyplot()
    variants = _variants(results)
    decoding, metric, label = headline(results)
    fig, axes = plt.subplots(2, len(variants), figsize=(4.2 * len(variants), 6.4), squeeze=False)
    for col, variant in enumerate(variants):
        models = cells(results, variant)
        for row_i, (range_name, inside) in enumerate(RANGES):
            ax = axes[row_i][col]

            def mean(runs, inside=inside):
                summary = over_seeds(runs, lambda run: range_mean(results, run, decoding, metric, inside))
                return summary[0] if summary else math.nan

            mamba_cells = [runs for runs in models.values()
                           if runs[0]["family"] == "mamba" and not runs[0].get("d_state_per_length")]
            for width in sorted({runs[0]["d_model"] for runs in mamba_cells}):
                line = sorted((runs for runs in mamba_cells if runs[0]["d_model"] == width),
                              key=lambda runs: runs[0]["d_state"])
                ax.plot([runs[0]["d_state"] for runs in line], [mean(runs) for runs in line], "-o",
                        label=f"Mamba d_model {width}", markersize=4)
            for model, runs in models.items():
                if runs[0]["family"] != "mamba":
                    ax.axhline(mean(runs), linestyle="--", linewidth=1, color="black",
                               label=f"{model} ({runs[0]['params'] / 1e3:.0f}k)")
            _finish_axes(ax, sorted({runs[0]["d_state"] for runs in mamba_cells}), "Mamba d_state",
                         f"{label},\nmean over test lengths {range_name}",
                         f"{results['spec']['task']}: {variant}, lengths {range_name}", log2=True)
            ax.yaxis.label.set_size(8)
    _save(plt, fig, path)
    return True


def plot_accuracy_vs_max_length(results: dict, path: Path) -> bool:
    """The headline at test length L against the longest training length L, one line per model
    (error bars: seeds), one panel per task variant. False (nothing written) without a sweep
    of L."""
    groups = _groups(results)
    if not results["spec"].get("train_max_lengths") or not results["runs"]:
        return False
    plt = _pyplot()
    decoding, metric, label = headline(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.6), squeeze=False)
    for col, (task_variant, by_length) in enumerate(groups.items()):
        ax = axes[0][col]
        models = list(dict.fromkeys(run["model"] for variant in by_length.values()
                                    for run in results["runs"] if run["variant"] == variant))
        for model in models:
            xs, ys, errors = [], [], []
            for hi, variant in by_length.items():
                runs = cells(results, variant).get(model)
                point = over_seeds(runs, lambda run, hi=hi: _at_length(run, hi, decoding, metric)) if runs else None
                if point is not None:
                    xs.append(hi)
                    ys.append(point[0])
                    errors.append(point[1] or 0.0)
            if not xs:
                continue
            family = cells(results, by_length[xs[0]])[model][0]
            style = "--s" if family["family"] != "mamba" else ("-^" if family.get("d_state_per_length") else "-o")
            ax.errorbar(xs, ys, yerr=errors if any(errors) else None, fmt=style, capsize=2, markersize=4, label=model)
        _finish_axes(ax, list(by_length), "longest training length L (tested at L)", label,
                     f"{results['spec']['task']}: {task_variant}")
    _save(plt, fig, path)
    return True


def write_report(results: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    (out_dir / "results.md").write_text(results_markdown(results))
    plot_accuracy_vs_length(results, out_dir / "accuracy_vs_length.png")
    plot_accuracy_vs_state(results, out_dir / "accuracy_vs_state.png")
    plot_accuracy_vs_max_length(results, out_dir / "accuracy_vs_max_length.png")
