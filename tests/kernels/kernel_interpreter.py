"""Run the Triton kernel tests on a CPU: in a child process started with TRITON_INTERPRET=1.

`triton.jit` decides at decoration time whether a function is compiled or interpreted, and
triton's own library functions are decorated when triton is first imported. In a full pytest
run some other test module imports triton (through transformers or torch) long before the
kernel tests are collected, so setting the variable in the test module is too late. The
kernel test modules therefore run their tests in-process only where that is safe (a CUDA
device, or TRITON_INTERPRET=1 set before Python started) and otherwise re-run their own file
in a child pytest process whose environment has the variable from the start.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

IN_PROCESS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Marks a test that needs the kernels importable here (compiled, or interpreted from the start).
in_process = pytest.mark.skipif(not IN_PROCESS, reason="run by the interpreter child process")


def run_file_under_interpreter(path: str) -> None:
    """Run the tests of `path` in a child pytest with TRITON_INTERPRET=1; fail if any fails."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-rfE", "-p", "no:cacheprovider"],
                          env=env, capture_output=True, text=True, timeout=600)
    # Name each failing test first: the child's output is cut to its tail below.
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    assert proc.returncode == 0, (f"interpreter run of {path} failed: {len(failed)} test(s)\n"
                                  + "\n".join(failed) + f"\n\n{proc.stdout[-6000:]}")
