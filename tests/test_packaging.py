"""The install layout: kernels ship as mamba_ft.kernels, never as a top-level `kernels`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mamba_ft_kernels_imports_from_the_kernels_directory():
    import mamba_ft.kernels

    assert Path(mamba_ft.kernels.__file__).resolve().parent == REPO / "kernels"


def test_top_level_kernels_is_not_this_project():
    # Run from a neutral directory so the repo root (which holds kernels/) is not on sys.path,
    # as for any user of the installed package.
    code = ("import importlib.util, sys; spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else 'none')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         check=True).stdout.strip()
    assert out == "none" or not Path(out).resolve().is_relative_to(REPO), out


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("mamba-ft") == "mamba_ft.cli:main"
    assert importlib.util.find_spec("mamba_ft.cli") is not None
