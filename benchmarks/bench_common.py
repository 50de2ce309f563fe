"""What the benchmark scripts share: how they time, what run header they record, how they
write their results (JSON + a markdown table under --out, benchmarks/results by default).

The scripts run as `python benchmarks/X.py`, which puts this folder first on sys.path, so they
import this module as `bench_common`: a name no installed package has (a file here named like
one, `kernels.py` say, would shadow that package for everything the script imports).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- timing -----------------------------------------------------------------------------------

def wall_seconds_per_call(fn: Callable[[], object], calls: int, warmup: int = 3,
                          synchronize: Callable[[], object] = torch.cuda.synchronize) -> float:
    """Wall seconds per call of `fn` over `calls` calls, after `warmup` untimed ones.

    `synchronize` runs before the clock starts and before it stops, so the time is of the work
    the calls queued, not of queueing it (a distributed run also passes its barrier here).
    """
    for _ in range(warmup):
        fn()
    synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return (time.perf_counter() - t0) / calls


def median_gpu_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds of one call of `fn` on the GPU (triton.testing.do_bench)."""
    # Imported here: the CPU-only scripts and the distributed workers do without Triton.
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def median_graph_replay_ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Median milliseconds of one call of `fn` replayed as a CUDA graph (do_bench_cudagraph).

    For ops whose GPU time is shorter than the host's time to launch them, which
    `median_gpu_ms` would measure instead.
    """
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep, return_mode="median")


# --- the run's header -------------------------------------------------------------------------

def utc_minute() -> str:
    """Now, in UTC, to the minute (ISO 8601): the `date` of every GPU result."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")


def gpu_run_info(device: str | None = None, **extra) -> dict:
    """The `info` of a GPU result: date, device (the current CUDA device's name unless given),
    torch, Triton and CUDA versions, then `extra`."""
    import triton

    info = dict(date=utc_minute(), device=device or torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    info.update(extra)
    return info


def device_and_versions(info: dict) -> str:
    """The start of a GPU table's caption: "Device: NAME; torch X, Triton Y"."""
    return f"Device: {info['device']}; torch {info['torch']}, Triton {info['triton']}"


# --- writing results --------------------------------------------------------------------------

def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row of cells.

    An empty cell is written `| |`, as in the tables already in results/.
    """
    def line(cells):
        return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"

    return [line(columns), "|" + "---|" * len(columns)] + [line(r) for r in rows]


def write_json(out: Path, name: str, data: dict, indent: int = 1) -> None:
    """Write `data` to OUT/NAME.json (creating OUT).

    The scripts write it before rendering the markdown, so a long GPU run's figures survive a
    table that fails to render.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=indent))


def write_markdown(out: Path, name: str, lines: list[str]) -> str:
    """Write `lines` to OUT/NAME.md, newline-terminated; return the text."""
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    return text


def stub_mamba_ssm_package(src: Path) -> None:
    """Make `import mamba_ssm.<module>` read the unpacked source tree `src` without running
    mamba_ssm/__init__.py, which pulls in its CUDA extensions, the Mamba-2/3 modules and their
    optional dependencies: a stub package module whose path is the tree's."""
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(src / "mamba_ssm")]
    sys.modules["mamba_ssm"] = pkg


def compiled_kernel_stats(module, names: list[str], constants: bool = False) -> list[dict]:
    """Registers and spills of every compiled variant of `module`'s Triton kernels `names`
    (for docs/kernels.md); with `constants`, the tail of each variant's specialisation key."""
    stats = []
    for name in names:
        jit_fn = getattr(module, name)
        try:
            for caches in jit_fn.device_caches.values():
                for key, kernel in caches[0].items():
                    kernel._init_handles()
                    row = dict(kernel=name, n_regs=kernel.n_regs, n_spills=kernel.n_spills,
                               num_warps=kernel.metadata.num_warps)
                    if constants:
                        row["constants"] = str(key)[-160:]
                    stats.append(row)
        except Exception as exc:  # Triton's internals move between versions; report, go on
            stats.append(dict(kernel=name, error=f"{type(exc).__name__}: {exc}"))
    return stats
