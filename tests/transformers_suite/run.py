"""Run transformers' own Mamba model tests against models built through mamba-ft.

    python tests/transformers_suite/run.py --hf-tests DIR [--work DIR] [-- PYTEST_ARGS...]

The tree is assembled in a scratch directory (never inside the repository: nothing of
transformers' is committed here) for the transformers version installed in this environment:

1. the common test files (`tests/*.py`: test_modeling_common.py, ...) from that version's sdist
   on PyPI (`pip download --no-binary :all:`); they win over anything in DIR, since they match
   the installed library exactly;
2. from DIR (a transformers checkout, its `tests/` folder, or a folder holding the few files
   below; also `$MAMBA_FT_HF_TESTS`), what the sdist does not ship:
   `tests/models/mamba/test_modeling_mamba.py` and what it imports, e.g.
   `tests/causal_lm_tester.py`, `tests/generation/test_utils.py`,
   `tests/exporters/test_export.py`, `tests/utils/test_configuration_utils.py`.
   Take them from the tag of the installed version (`git show vX.Y.Z:tests/...`).

Then pytest runs test_modeling_mamba.py with plugin.py loaded, which swaps every Mamba model the
tests build for mamba-ft's, minus DESELECT below. The exit status is pytest's; a missing test
file is an error (exit 2), never a pass.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN = HERE / "plugin.py"
MAMBA_TEST = Path("tests/models/mamba/test_modeling_mamba.py")

# Tests not run, each with its reason. Intended differences between mamba-ft and transformers:
# none. The entries below need what neither a developer machine nor CI has.
DESELECT: dict[str, str] = {
    "MambaIntegrationTests": "loads state-spaces/mamba-*-hf checkpoints and tokenizers from the "
                             "Hugging Face Hub, which this project's machines and CI cannot reach",
    "MambaModelTest::test_pipeline_": "pipeline tests build their models from "
                                      "hf-internal-testing tiny checkpoints on the Hub",
}

# Intended differences, applied by the plugin rather than by deselecting whole tests.
ADAPT = {
    "--force-silu": "mamba-ft's mixer implements SiLU only (every Mamba checkpoint uses it) and "
                    "refuses other activations; transformers' generic causal-LM tester builds "
                    "MambaConfig(hidden_act='gelu'), so configs get 'silu' instead",
}

# Modules the common files import relatively, with a stub to write when --stub-missing is
# given and DIR lacks them. A stub drops that mixin's tests: the run says so loudly.
STUBS = {
    "tests/generation/test_utils.py": (
        "class GenerationTesterMixin:\n    pass\n",
        "GenerationTesterMixin: transformers' generate() tests (greedy/sample/beam, cache "
        "continuation, ...) are NOT run",
    ),
    "tests/exporters/test_export.py": (
        "class ExportTesterMixin:\n    pass\n",
        "ExportTesterMixin: transformers' torch.export tests are NOT run",
    ),
}
# Data files the common files open at import time.
DATA_STUBS = {
    "tests/utils/tiny_model_summary.json": (
        "{}\n", "tiny_model_summary.json: an empty list of Hub tiny models (only the pipeline "
                "tests, deselected anyway, read it)",
    ),
}


def log(msg: str) -> None:
    print(f"[transformers-suite] {msg}", flush=True)


def sdist_tests(tf_version: str, cache: Path) -> Path:
    """The `tests/` folder of transformers' sdist for `tf_version`, extracted under `cache`."""
    root = cache / f"transformers-{tf_version}"
    if not (root / "tests").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        archives = list(cache.glob(f"transformers-{tf_version}.tar.gz"))
        if not archives:
            log(f"downloading the transformers {tf_version} sdist from PyPI")
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--no-binary", ":all:", f"transformers=={tf_version}", "-d", str(cache)],
                           check=True)
            archives = list(cache.glob(f"transformers-{tf_version}.tar.gz"))
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(f"transformers-{tf_version}/tests/")]
            tar.extractall(cache, members=members, filter="data")
    return root / "tests"


def find_user_tests(hf_tests: Path) -> Path | None:
    """The folder that plays transformers' `tests/` inside DIR."""
    for candidate in (hf_tests / "tests", hf_tests):
        if (candidate / "models" / "mamba" / "test_modeling_mamba.py").is_file():
            return candidate
    return None


def relative_imports(path: Path, tests_root: Path) -> set[Path]:
    """Files under tests_root that `path` imports with `from .x import` / `from ..x import`."""
    found = set()
    tree = ast.parse(path.read_text())
    package = path.parent
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.parent
            parts = node.module.split(".") if node.module else []
            target = base.joinpath(*parts)
            if target.with_suffix(".py").is_file():
                found.add(target.with_suffix(".py"))
            elif (target / "__init__.py").is_file():
                found.add(target / "__init__.py")
            elif node.module is None:
                for alias in node.names:
                    if (base / f"{alias.name}.py").is_file():
                        found.add(base / f"{alias.name}.py")
            else:
                found.add(target.with_suffix(".py"))  # missing: reported by the caller
    return {p for p in found if tests_root in p.parents or p.parent == tests_root}


def missing_imports(tests_root: Path) -> list[Path]:
    """Relative imports reachable from the Mamba test file that the tree cannot satisfy."""
    seen, todo, missing = set(), [tests_root.parent / MAMBA_TEST], []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if not path.is_file():
            missing.append(path.relative_to(tests_root.parent))
            continue
        todo.extend(relative_imports(path, tests_root))
    return sorted(missing)


def assemble(tf_version: str, hf_tests: Path | None, work: Path, stub_missing: bool) -> Path:
    """Build <work>/tree/tests; return <work>/tree."""
    tree = work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    tests = tree / "tests"
    user = find_user_tests(hf_tests) if hf_tests else None
    if user is None:
        where = f"in {hf_tests}" if hf_tests else "(no --hf-tests DIR and no $MAMBA_FT_HF_TESTS)"
        log(f"ERROR: no transformers Mamba model tests {where}: the tier did NOT run.")
        log(f"Point --hf-tests at a transformers {tf_version} checkout (or its tests/ folder) "
            f"holding {MAMBA_TEST}; PyPI's sdist does not ship tests/models/.")
        sys.exit(2)
    shutil.copytree(user, tests, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    common = sdist_tests(tf_version, work / "sdist")
    replaced = []
    for src in common.rglob("*"):
        if src.is_file():
            dst = tests / src.relative_to(common)
            if dst.is_file() and dst.read_bytes() != src.read_bytes():
                replaced.append(str(dst.relative_to(tree)))
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    log(f"common files from the transformers {tf_version} sdist; model tests from {user}")
    if replaced:
        log(f"sdist versions used instead of DIR's for: {', '.join(sorted(replaced))}")
    for folder in [tests, *[p for p in tests.rglob("*") if p.is_dir()]]:
        if "__pycache__" not in folder.parts:
            (folder / "__init__.py").touch(exist_ok=True)

    # Some common files read transformers' sources at <tree>/src/transformers, as in a checkout:
    # point that at the installed package.
    import importlib.util

    package = Path(importlib.util.find_spec("transformers").origin).parent
    (tree / "src").mkdir(exist_ok=True)
    (tree / "src" / "transformers").symlink_to(package, target_is_directory=True)

    missing = missing_imports(tests)
    missing += [Path(rel) for rel in DATA_STUBS if not (tree / rel).is_file()]
    stubbed = []
    for rel in list(missing):
        if stub_missing and str(rel) in {**STUBS, **DATA_STUBS}:
            text, what = {**STUBS, **DATA_STUBS}[str(rel)]
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.suffix == ".py":
                text = "# STUB written by mamba-ft's run.py --stub-missing\n" + text
            (tree / rel).write_text(text)
            (tree / rel).parent.joinpath("__init__.py").touch(exist_ok=True)
            stubbed.append(what)
            missing.remove(rel)
    if missing:
        log("ERROR: the Mamba tests import files that neither DIR nor the sdist has: "
            + ", ".join(map(str, missing)) + ". The tier did NOT run; add them to DIR.")
        sys.exit(2)
    for what in stubbed:
        log(f"WARNING: stubbed {what}")
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-tests", type=Path, default=os.environ.get("MAMBA_FT_HF_TESTS"),
                        help="transformers checkout / tests folder with tests/models/mamba "
                             "(default: $MAMBA_FT_HF_TESTS)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch directory (default: <tmp>/mamba-ft-hf-suite-<version>)")
    parser.add_argument("--stub-missing", action="store_true",
                        help="write empty mixins for generation/export test modules DIR lacks "
                             "(their tests are then not run; the run says so)")
    parser.add_argument("--baseline", action="store_true",
                        help="run the same tree against plain transformers (no swap): a test "
                             "failing there too is a mismatch of test files and library")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed on to pytest")
    args = parser.parse_args(argv)

    tf_version = version("transformers")
    work = (args.work or Path(tempfile.gettempdir()) / f"mamba-ft-hf-suite-{tf_version}").resolve()
    repo = HERE.parent.parent
    if repo == work or repo in work.parents:
        parser.error("--work must lie outside the repository (transformers' files are not "
                     "committed here)")
    hf_tests = args.hf_tests.resolve() if args.hf_tests else None
    tree = assemble(tf_version, hf_tests, work, args.stub_missing)
    (tree / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")

    deselect = []
    for pattern, reason in DESELECT.items():
        deselect += ["--deselect-pattern", pattern]
        log(f"deselected {pattern}: {reason}")
    for option, reason in ADAPT.items():
        deselect.append(option)
        log(f"{option}: {reason}")
    pytest_args = [str(tree / MAMBA_TEST), "-rfEs", "-W", "ignore::DeprecationWarning",
                   "-W", "ignore::pytest.PytestUnknownMarkWarning",
                   *deselect, *args.pytest_args]
    bootstrap = (
        "import importlib.util, sys, pytest\n"
        f"spec = importlib.util.spec_from_file_location('mamba_ft_transformers_suite_plugin', "
        f"{str(PLUGIN)!r})\n"
        "plugin = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = plugin\n"
        "spec.loader.exec_module(plugin)\n"
        "sys.exit(pytest.main(sys.argv[1:], plugins=[plugin]))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MAMBA_FT_SUITE_BASELINE"] = "1" if args.baseline else "0"  # one core: the tier runs beside other work
    # The repository root must not be on sys.path: its top-level kernels/ would shadow the
    # `kernels` package transformers imports. mamba_ft comes from the installed package.
    env.pop("PYTHONPATH", None)
    log(f"transformers {tf_version}: pytest {' '.join(pytest_args)}")
    rc = subprocess.run([sys.executable, "-c", bootstrap, *pytest_args], cwd=tree, env=env).returncode
    if rc == 5:
        log("ERROR: pytest collected no test: the tier did NOT run.")
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
