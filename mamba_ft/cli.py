"""The `mamba-ft` command: parse the arguments, call the function that does the work.

Every subcommand's work lives in its own module; this file only wires arguments to it and turns
a `UserError` into one line on stderr and exit code 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import functools
import sys

from mamba_ft.errors import UserError


def _train(args):
    from mamba_ft.training.loop import train_from_recipe

    train_from_recipe(args.recipe, args.overrides)


def validate_file(path, overrides: list[str] | None = None) -> tuple[str, str]:
    """What `mamba-ft validate` checks: a training recipe, or a synthetic spec (a mapping with
    `task` and no `model`: `mamba-ft synth`'s files), checked fully without running it.
    Returns (which of the two it is, the resolved YAML)."""
    from pathlib import Path

    import yaml

    from mamba_ft.recipe import load_recipe, read_yaml_mapping

    path = Path(path)
    if path.is_file():
        data = read_yaml_mapping(path, "Recipe", "sections: model, data, run, ...")
        if "task" in data and "model" not in data:
            from mamba_ft.synthetic.spec import load_spec

            spec = load_spec(str(path), overrides)
            return "synthetic spec (mamba-ft synth)", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    return "training recipe (mamba-ft train)", load_recipe(path, overrides).to_yaml()


def _validate(args):
    kind, resolved = validate_file(args.recipe, args.overrides)
    print(f"# {args.recipe}: a valid {kind}, resolved")
    print(resolved, end="")


def _merge(args):
    from mamba_ft.adapters.merge import merge_adapter_dir

    out = merge_adapter_dir(args.adapter_dir, args.out, base=args.base, overwrite=args.overwrite)
    print(f"merged model written to {out}")


def _info(args):
    from pathlib import Path

    from mamba_ft.models import load_model

    # A checkpoint directory must carry its tokenizer; a bare config has none.
    is_checkpoint = args.model.startswith("bundled:") or Path(args.model).is_dir()
    loaded = load_model(args.model, need_tokenizer=is_checkpoint, allow_transformers=True)
    print(args.model)
    for label, value in describe_model(loaded):
        print(f"  {label:<16}{value}")


def describe_model(loaded) -> list[tuple[str, str]]:
    """What `mamba-ft info` prints: family, geometry, vocabulary, size, dtype, adapter targets."""
    from collections import Counter

    from mamba_ft.models import mixers
    from mamba_ft.models.model_types import mamba_model_type
    from mamba_ft.modules import MambaFTMamba2Mixer

    model, config = loaded.model, loaded.model.config
    found = mixers(model)
    dtypes = Counter(str(p.dtype).replace("torch.", "") for p in model.parameters())
    rows = []
    entry = mamba_model_type(config.model_type)
    if entry is not None and isinstance(found[0], MambaFTMamba2Mixer):
        m = found[0]
        rows += [("family", f"{entry.name} (mamba-ft Mamba-2 mixers: {len(found)} of "
                            f"{config.num_hidden_layers} layers)"),
                 ("shape", f"d_model {config.hidden_size}, {config.num_hidden_layers} layers, "
                           f"{m.num_heads} heads x {m.head_dim}, {m.n_groups} B/C group(s), "
                           f"state {m.ssm_state_size}, conv {m.conv_kernel_size}, "
                           f"chunk {m.chunk_size}")]
    elif loaded.is_mamba:
        # Mamba-1 mixers: the geometry is the mixer's (the hybrids' configs name it otherwise).
        m = found[0]
        family = (f"{entry.name} (mamba-ft Mamba-1 mixers: {len(found)} of "
                  f"{config.num_hidden_layers} layers)" if entry.hybrid
                  else f"{entry.name} (mamba-ft mixers: {len(found)})")
        heads = f", {m.n_heads} SSM heads x {m.head_dim}" if m.n_heads is not None else ""
        rows += [("family", family),
                 ("shape", f"d_model {config.hidden_size}, {config.num_hidden_layers} layers, "
                           f"d_inner {m.intermediate_size}{heads}, state {m.ssm_state_size}, "
                           f"conv {m.conv_kernel_size}, dt rank {m.time_step_rank}")]
    else:
        rows += [("family", f"{config.model_type} (a Transformer baseline: plain transformers "
                            f"modules, PEFT LoRA)"),
                 ("shape", f"d_model {config.hidden_size}, {config.num_hidden_layers} layers")]
    tokenizer = f" (tokenizer: {len(loaded.tokenizer)} tokens)" if loaded.tokenizer is not None else ""
    rows += [("vocabulary", f"{config.vocab_size}{tokenizer}"),
             ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
             ("dtype", ", ".join(f"{name} ({count} tensors)" for name, count in dtypes.most_common()))]
    rows.append(("adapter targets", _adapter_targets(found)))
    if entry is not None and entry.hybrid:
        from mamba_ft.adapters.hybrid import layer_linears

        linears = layer_linears(model, found)
        for kind in ("attention", "mlp"):
            names = sorted({n.rsplit(".", 1)[-1] for n, k in linears.items() if k == kind})
            count = sum(k == kind for k in linears.values())
            if count:
                rows.append((f"{kind} LoRA", f"{kind} = {count} Linears ({', '.join(names)})"))
    return rows


def _adapter_targets(found: list) -> str:
    from mamba_ft.adapters.families import family_of_model

    if not found:
        return "its module names, or all_linear (PEFT LoRA)"
    family = family_of_model(found).targets
    return f"{', '.join(family.targets)}; aliases {', '.join(family.aliases)}"


def _synth(args):
    from mamba_ft.synthetic.experiment import run_synth_cli

    run_synth_cli(args)


def _generate(args):
    from mamba_ft.generation import main_from_cli

    main_from_cli(args)


def _stability(args):
    from mamba_ft.evaluation.stability_report import main_from_cli

    main_from_cli(args)


def _icl(args):
    from mamba_ft.evaluation.sweep import main_from_cli

    main_from_cli(args)


def _paper(args):
    from mamba_ft.paper import main_from_cli

    main_from_cli(args)


DESCRIPTION = ("Fine-tune Mamba language models (adapters on every buffer, mixed precision, "
               "fused kernels) and measure what it buys: few-shot ICL sweeps and synthetic tasks.")


def _add_sweep_options(p: argparse.ArgumentParser, limit_type, out_holds: str) -> None:
    """The ICL sweep's options, shared by `icl` and `paper` (which runs the sweeps itself)."""
    p.add_argument("--tasks", default="mamba_ft_icl",
                   help="comma-separated lm-eval tasks (default: the bundled rule tasks)")
    p.add_argument("--shots", default="0,1,3,5")
    p.add_argument("--seeds", default="1234,1235,1236", help="few-shot sampling seeds")
    p.add_argument("--limit", type=limit_type, default=None,
                   help="documents per task (a number < 1 is a fraction)")
    p.add_argument("--batch-size", default="8", help="evaluation batch size of the ICL sweeps")
    p.add_argument("--online", action="store_true",
                   help="let models and datasets come from the Hugging Face Hub")
    p.add_argument("--out", default=None, help=f"directory for {out_holds}")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    parser = argparse.ArgumentParser(prog="mamba-ft", description=DESCRIPTION, parents=[common])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])

    p = sub.add_parser("train", help="train from a YAML recipe")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 run.max_steps=50")
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="check a training recipe or a synthetic spec and print it resolved")
    p.add_argument("recipe", help="recipe YAML file (recipes/*.yaml) or synthetic spec (recipes/synthetic/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    p.set_defaults(func=_validate)

    p = sub.add_parser("merge", help="fold an adapter into its base model: a plain transformers checkpoint")
    p.add_argument("adapter_dir", help="an adapter directory a training run saved (OUTPUT_DIR/adapter)")
    p.add_argument("--out", required=True, help="directory for the merged model (must not exist)")
    p.add_argument("--base", default=None, help="base model (default: the one recorded in the adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds a model")
    p.set_defaults(func=_merge)

    p = sub.add_parser("info", help="load a model and print what it is")
    p.add_argument("model", help="checkpoint directory, config file, hub id or bundled:NAME")
    p.set_defaults(func=_info)
    p = sub.add_parser("synth", help="train Mamba and a matched Transformer on COPY / recall / CoT tasks")
    from mamba_ft.synthetic.experiment import add_synth_arguments

    add_synth_arguments(p)
    p.set_defaults(func=_synth)
    p = sub.add_parser("icl", help="few-shot ICL sweep through lm-eval: Mamba vs Transformers, gain and ratio")
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                   help="model to evaluate (repeat): checkpoint dir, hub id or bundled:NAME")
    p.add_argument("--adapter", action="append", metavar="LABEL=DIR", help="attach a saved adapter to model LABEL")
    p.add_argument("--tokenizer", action="append", metavar="LABEL=DIR", help="tokenizer for model LABEL")
    _add_sweep_options(p, limit_type=float, out_holds="results.json, results.md and the plots")
    p.add_argument("--baseline", default=None, help="label the ratio divides by (default: the first Transformer)")
    p.add_argument("--data", action="append", metavar="TASK=DIR", help="local split files for a task (repeat)")
    p.add_argument("--bootstrap-iters", type=int, default=None,
                   help="lm-eval's bootstrap iterations for the scores' standard errors "
                        "(default 1000; 0 turns standard errors and intervals off)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="dtype the weights are loaded in")
    p.add_argument("--autocast", default=None, choices=["bfloat16", "float16"],
                   help="run the forwards under autocast (weights stay in --dtype)")
    p.set_defaults(func=_icl)

    p = sub.add_parser("paper", help="Halloran et al.'s experiment: fine-tune a Mamba and a Transformer "
                                     "with MPFT+PEFT, ICL gain ratio before and after, cost, drift (docs/icl.md)")
    # Numbers arrive as text and are checked in mamba_ft/paper.py: a bad value is one
    # `mamba-ft: error:` line like every other mistake, not argparse's usage block.
    p.add_argument("--mamba", default="bundled:tiny-mamba", help="the Mamba (default: bundled:tiny-mamba)")
    p.add_argument("--transformer", default="bundled:tiny-gpt-neox",
                   help="the same-size Transformer (default: bundled:tiny-gpt-neox)")
    p.add_argument("--data", default=None, help="alpaca-format training data: file, datasets dir or hub "
                                                "name (default: instruction rows generated from the rule corpus)")
    p.add_argument("--eval-data", default=None, help="alpaca-format eval data for --data")
    _add_sweep_options(p, limit_type=str, out_holds="results.json, results.md, the runs and sweeps")
    p.add_argument("--steps", default="60", help="optimizer steps of every fine-tune")
    p.add_argument("--precision", default="bf16", help="bf16, fp16 (CUDA) or fp32: the MPFT+PEFT runs' autocast")
    p.add_argument("--lr", default="1e-3")
    p.add_argument("--micro-batch-size", default="8")
    p.add_argument("--max-length", default="256", help="tokens per training example")
    p.add_argument("--rank", default="8", help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--training-seeds", default="0",
                   help="comma-separated training seeds (adapter init, data order): each fine-tunes "
                        "both models once, and the tuned ratio gets an interval over them; use 3 or "
                        "more (default: 0)")
    p.add_argument("--data-seed", default=None, help="seed of the generated instruction data (default: 0)")
    # The old single --seed: an error naming its replacements (and, being defined, it keeps
    # argparse from reading `--seed` as an abbreviation of --seeds).
    p.add_argument("--seed", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_paper)

    p = sub.add_parser("generate", help="text from a model or a fine-tuned adapter, streamed to stdout")
    p.add_argument("model", help="checkpoint directory, adapter directory, config file, hub id or bundled:NAME")
    p.add_argument("--adapter", default=None, help="an adapter directory to attach to MODEL")
    p.add_argument("--prompt", default=None, help="the prompt text")
    p.add_argument("--prompt-file", default=None, help="a file whose whole text is the prompt")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (at least 1)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (> 0; with --sample)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (with --sample)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (with --sample)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the weights are loaded in")
    p.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    p.add_argument("--eager", action="store_true",
                   help="run each decoding step eagerly instead of replaying it as a CUDA graph")
    p.set_defaults(func=_generate)

    p = sub.add_parser("stability", help="how far bf16 / fp16 move a model's outputs, and how its "
                                         "dynamics carry a small input change (docs/precision.md)")
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                   help="model to probe (repeat): checkpoint dir, adapter dir or bundled:NAME")
    p.add_argument("--adapter", action="append", metavar="LABEL=DIR", help="attach a saved adapter to model LABEL")
    p.add_argument("--text", default=None, help="a text file to read (default: the bundled rule corpus)")
    p.add_argument("--rows", type=int, default=4, help="rows of tokens")
    p.add_argument("--length", type=int, default=128, help="tokens per row")
    p.add_argument("--precisions", default="bf16,fp16", help="low precisions to compare with fp32")
    p.add_argument("--how", default="autocast,weights",
                   help="autocast (fp32 weights, low-precision compute), weights (weights cast), or both")
    p.add_argument("--position", type=int, default=8, help="position the perturbation probe moves")
    p.add_argument("--epsilon", type=float, default=1e-3, help="size of that perturbation")
    p.add_argument("--out", required=True, help="directory for stability.json, stability.md and the plots")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.set_defaults(func=_stability)
    return parser


def _version() -> str:
    from importlib.metadata import version

    return version("mamba-ft")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as exc:
        if debug:
            raise
        print(f"mamba-ft: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        # The training loop has already said where to resume from.
        print("mamba-ft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
