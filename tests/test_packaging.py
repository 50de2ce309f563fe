"""The install layout: kernels ship as mamba_ft.kernels, never as a top-level `kernels`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_mamba_ft_kernels_imports_from_the_kernels_directory():
    import mamba_ft.kernels

    assert Path(mamba_ft.kernels.__file__).resolve().parent == REPO / "kernels" / "triton"


@pytest.mark.parametrize("cwd", ["/", str(REPO)])
def test_top_level_kernels_is_not_this_project(cwd):
    # From the repo root (`python -m ...`, `accelerate launch -m mamba_ft.cli`) the root is on
    # sys.path; kernels/ must not be found as a package there, or it shadows Hugging Face's
    # `kernels`, which transformers 5.25 imports on every model import.
    code = ("import importlib.util; spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec and spec.origin else 'none'); "
            "import transformers.activations")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                         check=True).stdout.strip()
    assert out == "none" or not Path(out).resolve().is_relative_to(REPO / "kernels"), out


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("mamba-ft") == "mamba_ft.cli:main"
    assert importlib.util.find_spec("mamba_ft.cli") is not None
