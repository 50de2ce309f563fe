"""results.md of `mamba-ft paper` (mamba_ft/paper.py): the ICL gains and Mamba/Transformer
ratios before and after fine-tuning, the cost of MPFT+PEFT against an fp32 full fine-tune, and
the drift between the same recipe tuned in low precision and in fp32."""

from __future__ import annotations


def _points(gain: dict) -> str:
    ci = "–" if gain["ci"] is None else f"[{100 * gain['ci'][0]:+.1f}, {100 * gain['ci'][1]:+.1f}]"
    return f"{100 * gain['mean']:+.1f} | {ci}"


def _ratio(ratio: dict) -> str:
    value = "n/a (Transformer gain 0)" if ratio["ratio"] is None else f"{100 * ratio['ratio']:.1f}%"
    if ratio["ci"] is not None:
        ci = f"[{100 * ratio['ci'][0]:.1f}%, {100 * ratio['ci'][1]:.1f}%]"
    else:
        ci = "unbounded" if ratio["ci_unbounded"] else "–"
    return f"{value} | {ci}"


def summary(results: dict) -> str:
    """The headline table: gains and the ratio, before and after fine-tuning."""
    icl = results["icl"]
    lines = ["| | Mamba gain (points) | 95% interval | Transformer gain (points) | 95% interval | "
             "Mamba / Transformer | 95% interval |", "|---|---|---|---|---|---|---|"]
    tuned = f"fine-tuned ({results['settings']['precision']} + LoRA)"
    for stage, name in (("before", "pretrained"), ("after", tuned)):
        models = icl[stage]["models"]
        lines.append(f"| {name} | {_points(models['mamba']['gain'])} | "
                     f"{_points(models['transformer']['gain'])} | {_ratio(icl[stage]['ratio'])} |")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Fine-tuned ICL: {results['sources']['mamba']} against {results['sources']['transformer']}",
             "",
             f"One recipe for both models: LoRA r {s['rank']} on `all_linear`, {s['precision']} "
             f"autocast, lr {s['lr']}, {s['steps']} steps of {s['micro_batch_size']} examples, seed "
             f"{s['seed']}, data {results['data']['train']}. ICL: tasks {s['tasks']}, shots "
             f"{', '.join(map(str, s['shots']))}, few-shot seeds {', '.join(map(str, s['seeds']))}, "
             f"limit {s['limit'] or 'none'}; gain = mean over tasks and k > 0 of "
             f"(score at k shots − score at 0), in points (docs/icl.md).", "",
             "## ICL gain and the ratio Mamba / Transformer", "", summary(results),
             "The tuned models are each base model with the adapter its MPFT+PEFT run saved:"]
    for model in ("mamba", "transformer"):
        lines.append(f"- {model}: `{results['icl']['after']['models'][model]['adapter']}`")
    lines += ["", f"Per-task scores: {results['icl']['before']['dir']}/results.md and "
                  f"{results['icl']['after']['dir']}/results.md.", "", *_cost_lines(results)]
    if results["drift"] is not None:
        lines += ["", *_drift_lines(results)]
    return "\n".join(lines) + "\n"


def _cost_lines(results: dict) -> list[str]:
    precision = results["settings"]["precision"]
    lines = [f"## Cost: MPFT+PEFT ({precision} + LoRA) against an fp32 full fine-tune", "",
             "Same model, data, seed and steps; from each run's metrics.jsonl (tokens/s: median "
             "over the steps after the first; peak memory: the largest recorded).", "",
             "| model | run | tokens/s | peak memory (MB) | speed-up | memory per token saved |",
             "|---|---|---|---|---|---|"]
    for model, cost in results["costs"].items():
        lines.append(f"| {model} | fp32 full fine-tune | {cost['full']['tokens_per_s']:,.0f} | "
                     f"{cost['full']['peak_memory_mb']:,.0f} | | |")
        lines.append(f"| {model} | {precision} + LoRA | {cost['peft']['tokens_per_s']:,.0f} | "
                     f"{cost['peft']['peak_memory_mb']:,.0f} | {cost['speedup']:.2f}x | "
                     f"{100 * cost['memory_per_token_saving']:.1f}% |")
    if any(cost["device"] == "cpu" for cost in results["costs"].values()):
        lines += ["", "On a CPU the peak is the process's resident memory, the Python and torch "
                      "runtime included, so for small models it mostly measures the runtime."]
    return lines


def _drift_lines(results: dict) -> list[str]:
    precision = results["settings"]["precision"]
    lines = [f"## Drift: the same recipe tuned in {precision} and in fp32", "",
             f"Both adapters on the base model, run in fp32 on held-out rule-corpus text "
             f"({results['settings']['drift_rows']} rows x {results['settings']['drift_length']} "
             f"tokens); KL(p_fp32-tuned || p_{precision}-tuned) per position. For scale, the last "
             f"column is how far fine-tuning moved the model at all (base against fp32-tuned).", "",
             f"| model | mean KL (nats) | max KL | mean rel. logit error | eval loss fp32 | "
             f"eval loss {precision} | KL base -> fp32-tuned |", "|---|---|---|---|---|---|---|"]
    for model, d in results["drift"].items():
        losses = d["eval_loss"]
        fp32, low = losses["peft-fp32"], losses[d["other"]]
        lines.append(f"| {model} | {d['mean_kl']:.2e} | {d['max_kl']:.2e} | {d['mean_logit_rel_error']:.2e} | "
                     f"{_loss(fp32)} | {_loss(low)} | {d['fine_tuning_change']['mean_kl']:.2e} |")
    lines += ["", f"Eval losses are each run's final one, computed under its own precision "
                  f"({precision} autocast, fp32)."]
    return lines


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
