"""results.md of `mamba-ft paper` (mamba_ft/paper.py): the ICL gains and Mamba/Transformer
ratios before and after fine-tuning (per training seed and over them), the cost of MPFT+PEFT
against an fp32 full fine-tune, and the drift between the same recipe tuned in low precision
and in fp32 (both from the first training seed's runs)."""

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
    """The headline table: gains and the ratio, before fine-tuning, after it per training seed
    and, with several training seeds, their mean with the interval over seeds."""
    icl = results["icl"]
    seeds = results["training_seeds"]
    lines = ["| | Mamba gain (points) | 95% interval | Transformer gain (points) | 95% interval | "
             "Mamba / Transformer | 95% interval |", "|---|---|---|---|---|---|---|"]
    tuned = f"fine-tuned ({results['settings']['precision']} + LoRA)"
    rows = [("pretrained", icl["before"]["models"], icl["before"]["ratio"])]
    for seed in seeds:
        after = icl["after"][str(seed)]
        rows.append((f"{tuned}, training seed {seed}", after["models"], after["ratio"]))
    if len(seeds) > 1:
        over = icl["over_training_seeds"]
        rows.append((f"{tuned}, mean over {len(seeds)} training seeds",
                     {model: {"gain": gain} for model, gain in over["models"].items()}, over["ratio"]))
    for name, models, ratio in rows:
        lines.append(f"| {name} | {_points(models['mamba']['gain'])} | "
                     f"{_points(models['transformer']['gain'])} | {_ratio(ratio)} |")
    return "\n".join(lines) + "\n"


def _interval_lines(results: dict) -> list[str]:
    """What the intervals of the headline table hold."""
    seeds = results["training_seeds"]
    lines = ["Each row of one sweep (pretrained, one training seed) has the sweep's own 95% intervals: "
             "the documents and few-shot draws of its evaluation (docs/icl.md, \"Intervals\"), "
             "not the training run."]
    if len(seeds) == 1:
        return lines + ["", f"One training seed: nothing here measures how much the tuned gains and "
                            f"ratio change from one fine-tune to the next; pass --training-seeds with "
                            f"3 or more seeds (e.g. --training-seeds 0,1,2) for an interval over "
                            f"fine-tunes."]
    over = results["icl"]["over_training_seeds"]
    models, ratio = over["models"], over["ratio"]

    def interval(ci, unbounded=False, percent=False):
        if ci is None:
            return "unbounded" if unbounded else "–"
        return (f"[{100 * ci[0]:.1f}%, {100 * ci[1]:.1f}%]" if percent
                else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]")

    lines += ["", f"The mean row is over {len(seeds)} training seeds ({', '.join(map(str, seeds))}); its "
                  f"ratio divides the mean gains. Its 95% interval adds in quadrature a Student-t "
                  f"half-width over the training seeds (t = {over['t_quantile']:.2f} with "
                  f"{len(seeds) - 1} degree{'s' if len(seeds) > 2 else ''} of freedom: the spread "
                  f"between fine-tunes) and the "
                  f"evaluation's (z = {over['z']:.2f} times the seeds' mean standard error, counted as "
                  f"shared by all seeds, which are scored on the same documents and few-shot draws: "
                  f"conservative); the ratio's is Fieller's set for the same two parts, the seed part "
                  f"paired by seed. Over the training seeds alone, given these documents and draws: "
                  f"Mamba {interval(models['mamba']['ci_seeds'])}, Transformer "
                  f"{interval(models['transformer']['ci_seeds'])}, ratio "
                  f"{interval(ratio['ci_seeds'], ratio['ci_seeds_unbounded'], percent=True)}."]
    return lines


def markdown(results: dict) -> str:
    s = results["settings"]
    seeds = results["training_seeds"]
    data_seed = f" (generated, data seed {s['data_seed']})" if s["data"] is None else ""
    lines = [f"# Fine-tuned ICL: {results['sources']['mamba']} against {results['sources']['transformer']}",
             "",
             f"One recipe for both models: LoRA r {s['rank']} on `all_linear`, {s['precision']} "
             f"autocast, lr {s['lr']}, {s['steps']} steps of {s['micro_batch_size']} examples, "
             f"training seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (each "
             f"fine-tunes both models once: adapter init and data order), data "
             f"{results['data']['train']}{data_seed}. ICL: tasks {s['tasks']}, shots "
             f"{', '.join(map(str, s['shots']))}, few-shot seeds {', '.join(map(str, s['seeds']))}, "
             f"limit {s['limit'] or 'none'}; gain = mean over tasks and k > 0 of "
             f"(score at k shots − score at 0), in points (docs/icl.md).", "",
             "## ICL gain and the ratio Mamba / Transformer", "", summary(results),
             *_interval_lines(results), "",
             "The tuned models are each base model with the adapter its MPFT+PEFT run saved (as "
             "each sweep loaded it):"]
    for seed in seeds:
        after = results["icl"]["after"][str(seed)]
        for model in ("mamba", "transformer"):
            lines.append(f"- training seed {seed}, {model}: `{after['models'][model]['adapter']}`")
    sweeps = [results["icl"]["before"]["dir"]] + [results["icl"]["after"][str(seed)]["dir"] for seed in seeds]
    lines += ["", f"Per-task scores: {', '.join(f'{d}/results.md' for d in sweeps)}.", "",
              *_cost_lines(results)]
    if results["drift"] is not None:
        lines += ["", *_drift_lines(results)]
    return "\n".join(lines) + "\n"


def _cost_lines(results: dict) -> list[str]:
    precision = results["settings"]["precision"]
    lines = [f"## Cost: MPFT+PEFT ({precision} + LoRA) against an fp32 full fine-tune", "",
             f"Same model, data, training seed ({results['costs_and_drift_training_seed']}, the first: "
             f"cost is not repeated per seed) and steps; from each run's metrics.jsonl (tokens/s: "
             f"median over the steps after the first; peak memory: the largest recorded).", "",
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
             f"column is how far fine-tuning moved the model at all (base against fp32-tuned). "
             f"Runs of training seed {results['costs_and_drift_training_seed']} (the first; drift is "
             f"not repeated per seed).", "",
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
