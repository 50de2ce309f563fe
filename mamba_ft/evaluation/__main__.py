"""`python -m mamba_ft.evaluation ARGS`: lm-eval's command line with the `mamba-ft` model.

lm-eval finds models only in its own registry and has no plugin discovery, so a bare
`lm_eval --model mamba-ft` cannot see this package. This entry point registers the model,
adds the bundled task directory to `--include_path` (unless one is given) and hands the
arguments to lm-eval unchanged, e.g.

    python -m mamba_ft.evaluation --model mamba-ft \\
        --model_args pretrained=bundled:tiny-mamba,adapter=runs/x/adapter \\
        --tasks icl_reverse --num_fewshot 3 --device cpu --batch_size 8
"""

import sys

from lm_eval.__main__ import cli_evaluate

import mamba_ft.evaluation.lm_eval_model  # noqa: F401  (registers the "mamba-ft" model)
from mamba_ft.errors import UserError
from mamba_ft.evaluation.tasks import BUNDLED_TASKS_DIR


def main() -> None:
    argv = sys.argv[1:]
    # run, ls and validate all take --include_path; a bare help request gets none added.
    asks_help_only = argv in ([], ["-h"], ["--help"])
    if not asks_help_only and not any(a.split("=")[0] == "--include_path" for a in argv):
        argv += ["--include_path", str(BUNDLED_TASKS_DIR)]
    sys.argv = [sys.argv[0]] + argv
    try:
        cli_evaluate()
    except UserError as exc:  # a wrong path or argument in model_args: one line, exit 2
        print(f"mamba-ft: error: {exc}", file=sys.stderr)
        sys.exit(UserError.exit_code)


if __name__ == "__main__":
    main()
