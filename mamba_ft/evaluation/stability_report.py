"""`mamba-ft stability`: the stability probes (`evaluation.stability`) on several models over
the same tokens, written as stability.json, stability.md and two plots.

    mamba-ft stability --model bundled:tiny-mamba --model bundled:tiny-gpt-neox --out DIR

Every model reads the same text (the bundled rule corpus unless --text names a file),
tokenized by its own tokenizer and cut into --rows rows of --length tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mamba_ft.errors import UserError
from mamba_ft.evaluation.stability import (LOW_PRECISIONS, model_perturbation_growth,
                                            precision_divergence)

OUTPUT_FILES = ("stability.json", "stability.md", "kl_by_position.png", "perturbation.png")


def token_rows(tokenizer, text: str, rows: int, length: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < rows * length:
        raise UserError(f"The text gives {len(ids)} tokens, fewer than --rows x --length = "
                        f"{rows * length}; give a longer --text file or lower --rows / --length.")
    return torch.tensor(ids[: rows * length]).view(rows, length)


def default_text() -> str:
    from mamba_ft.rules import make_corpus

    return "".join(make_corpus(seed=7, n_documents=400))


def run_stability(models: dict[str, tuple], text: str, *, rows: int = 4, length: int = 128,
                  precisions=("bf16", "fp16"), hows=("autocast", "weights"), position: int = 8,
                  epsilon: float = 1e-3) -> dict:
    """{label: {"divergence": [...], "perturbation": {...}}} for `models` {label: (model, tokenizer)}."""
    for name in precisions:
        if name not in LOW_PRECISIONS:
            raise UserError(f"Unknown precision {name!r}; choose from {', '.join(LOW_PRECISIONS)}.")
    for how in hows:
        if how not in ("autocast", "weights"):
            raise UserError(f"Unknown --how {how!r}; choose autocast (fp32 weights, low-precision "
                            f"compute), weights (the weights cast), or both.")
    if not 0 <= position < length - 1:
        raise UserError(f"--position {position} must lie before the last of --length {length} tokens.")
    results = {}
    for label, (model, tokenizer) in models.items():
        ids = token_rows(tokenizer, text, rows, length).to(next(model.parameters()).device)
        divergences = [precision_divergence(model, ids, name, how) for name in precisions for how in hows]
        growth = model_perturbation_growth(model, ids, position=position, epsilon=epsilon)
        results[label] = {
            "divergence": [{**d.summary(), "kl": d.kl, "logit_rel_error": d.logit_rel_error,
                            "state_rel_error": d.state_rel_error} for d in divergences],
            "perturbation": {**growth.summary(), "deviation": growth.deviation},
        }
    return results


def write_report(results: dict, settings: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.json").write_text(json.dumps({"settings": settings, "models": results}, indent=1))
    (out / "stability.md").write_text(markdown(results, settings))
    _plot_kl(results, out / "kl_by_position.png")
    _plot_perturbation(results, out / "perturbation.png")


def markdown(results: dict, settings: dict) -> str:
    lines = [f"# Precision stability ({settings['rows']} rows x {settings['length']} tokens)", "",
             "| model | precision | how | mean KL (nats) | max KL | mean rel. logit error | "
             "max rel. state error |", "|---|---|---|---|---|---|---|"]
    for label, result in results.items():
        for d in result["divergence"]:
            state = "n/a" if d["max_state_rel_error"] is None else f"{d['max_state_rel_error']:.2e}"
            lines.append(f"| {label} | {d['precision']} | {d['how']} | {d['mean_kl']:.2e} | "
                         f"{d['max_kl']:.2e} | {d['mean_logit_rel_error']:.2e} | {state} |")
    lines += ["", f"Perturbation of size {settings['epsilon']} at position {settings['position']}: "
              "the largest per-layer exponent of the deviation's growth per position "
              "(negative: the model forgets it).", "", "| model | largest exponent | per layer |",
              "|---|---|---|"]
    for label, result in results.items():
        p = result["perturbation"]
        layers = ", ".join("n/a" if e is None else f"{e:+.3f}" for e in p["exponent_per_layer"])
        largest = "n/a" if p["largest_exponent"] is None else f"{p['largest_exponent']:+.3f}"
        lines.append(f"| {label} | {largest} | {layers} |")
    return "\n".join(lines) + "\n"


def _plot_kl(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, result in results.items():
        for d in result["divergence"]:
            ax.plot(range(len(d["kl"])), d["kl"], label=f"{label} {d['precision']} {d['how']}")
    ax.set_xlabel("position")
    ax.set_ylabel("KL(fp32 || low precision), nats")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_perturbation(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, result in results.items():
        last = result["perturbation"]["deviation"][-1]
        ax.plot(range(len(last)), last, label=f"{label} (last layer)")
    ax.set_xlabel("positions after the perturbed one")
    ax.set_ylabel("hidden-state deviation / epsilon")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main_from_cli(args) -> dict:
    """The `mamba-ft stability` command (arguments parsed in mamba_ft.cli)."""
    from mamba_ft.evaluation.sweep import parse_model_args
    from mamba_ft.models import load_model

    out = Path(args.out)
    present = [name for name in OUTPUT_FILES if (out / name).exists()]
    if present and not args.overwrite:
        raise UserError(f"{out} already holds stability results ({', '.join(present)}); choose "
                        f"another --out or pass --overwrite.")
    text = default_text()
    if args.text is not None:
        try:
            text = Path(args.text).read_text()
        except OSError as exc:
            raise UserError(f"Could not read --text {args.text}: {exc.strerror}; give a text file.") from None
    models = {}
    for spec in parse_model_args(args.model, args.adapter):
        loaded = load_model(spec.source, allow_transformers=True)
        if spec.adapter is not None:
            from mamba_ft.adapters import load_adapters

            load_adapters(loaded.model, spec.adapter)
        models[spec.label] = (loaded.model, loaded.tokenizer)
    settings = {"rows": args.rows, "length": args.length, "precisions": args.precisions.split(","),
                "hows": args.how.split(","), "position": args.position, "epsilon": args.epsilon,
                "models": list(args.model), "adapters": args.adapter or []}
    results = run_stability(models, text, rows=args.rows, length=args.length,
                            precisions=settings["precisions"], hows=settings["hows"],
                            position=args.position, epsilon=args.epsilon)
    write_report(results, settings, out)
    print(markdown(results, settings), end="")
    print(f"written to {out}: {', '.join(OUTPUT_FILES)}")
    return results
