"""Timing, memory and reporting helpers shared by the benchmark scripts.

Why these, and not a timer around a loop:

- **Interleaved timing** (``interleaved_timings``): the machines we benchmark on are shared, so their speed drifts
  within a run. Timing candidate A for a minute and then B for a minute turns that drift into a fake ratio;
  alternating A, B, B, A, ... exposes both to the same conditions, and the median drops the outliers.
- **Peak memory in a fresh process** (``run_in_fresh_process`` + ``reset_peak_rss`` / ``peak_rss_mib``): the CPU
  allocator keeps freed memory and a process's RSS high-water mark never goes down, so measuring two candidates in one
  process (or after building something bigger) measures the history, not the candidate. Each measurement runs in its
  own Python; inside it, ``reset_peak_rss`` zeroes the kernel's high-water mark (``/proc/self/clear_refs``) once the
  setup is done, so the peak covers the measured work alone (plus what the process already held).
- **Ratios against peers measured in the same run**, saved as a Markdown table, a JSON file and a PNG plot
  (``write_results``, ``bar_plot``), with the environment they were measured in (``environment``).

A script usually: builds its candidates, calls ``interleaved_timings`` on zero-argument callables, measures memory by
calling a function of its own file through ``run_in_fresh_process``, and writes ``benchmarks/results/<name>.*``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---- time ------------------------------------------------------------------------------------------------------------
def interleaved_timings(
    candidates: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Call each zero-argument callable ``warmup`` times (untimed), then ``repeats`` timed times, in the order
    A B ... then ... B A (the order flips every round so neither candidate always runs first). Returns the seconds of
    every timed call, per candidate, by ``clock``: ``time.process_time`` counts this process's CPU seconds, which on
    an oversubscribed machine (one thread) tracks the work far better than the wall clock, mostly the scheduler's."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = clock()
            candidates[name]()
            times[name].append(clock() - start)
    return times


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


# ---- memory ----------------------------------------------------------------------------------------------------------
def current_rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    status = _proc_status()
    if "VmRSS" in status:
        return status["VmRSS"]
    return peak_rss_mib()  # no /proc: the best available upper bound


def peak_rss_mib() -> float:
    """The highest resident memory of this process (MiB) since it started or since the last ``reset_peak_rss``."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``).
    Returns False where that is impossible; ``peak_rss_mib`` then includes the setup."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so memory a setup
    step freed (a model that was converted and dropped) is not counted as resident afterwards."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status() -> dict[str, float]:
    values = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = float(rest.split()[0]) / 1024  # kB -> MiB
    except OSError:
        pass
    return values


# glibc serves allocations above a threshold with mmap and returns them on free, but raises that threshold each time
# such a block is freed: later tensors then land in the heap, whose free pages linger, and the peak RSS of identical
# runs wanders by tens of MiB. A fixed threshold keeps every tensor-sized block in mmap, so RSS follows live memory.
STEADY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
# The opposite: no mmap at all and no trimming, so freed memory is always reused from the heap. glibc cannot raise its
# mmap threshold above 32 MiB, so with its defaults every tensor of 32 MiB or more (one (1, 8, 16384, 64) fp32
# activation) is a fresh mapping whose pages fault in on first touch, each step; at 8k the same tensors are 16 MiB
# and get reused. That makes time(16k)/time(8k) of any step with such temporaries superlinear under the defaults.
# Long-running processes that use jemalloc or tcmalloc (PyTorch's CPU tuning guide suggests them) behave like this.
HEAP_REUSE_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
# torch's own switch: its CPU allocator aligns blocks of 2 MiB or more to 2 MiB and asks for transparent huge pages
# (madvise), so a fresh 32 MiB mapping faults in 16 huge pages instead of 8192 small ones (~2.5 against ~7.5-12 ms
# measured here). glibc's defaults otherwise; needs THP in "madvise" or "always" mode.
THP_MALLOC_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}
# --malloc choices of the benchmark scripts: name -> environment of the measuring children (None: glibc's defaults)
MALLOC_CHOICES = {"default": None, "reuse": HEAP_REUSE_MALLOC_ENV, "thp": THP_MALLOC_ENV}
MALLOC_HELP = ("glibc's defaults; 'reuse': heap reuse without mmap (HEAP_REUSE_MALLOC_ENV), the steady state of "
               "a long run; 'thp': torch's huge-page allocations (THP_MEM_ALLOC_ENABLE=1). The last two remove "
               "most of the page faults of fresh >= 32 MiB blocks")


def run_in_fresh_process(
    script: str | Path,
    function: str,
    kwargs: dict[str, Any],
    timeout: float | None = None,
    threads: int | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``function(**kwargs)`` from the file ``script`` in a new Python process and return what it returns (a
    JSON-serialisable dict). ``threads`` pins the BLAS/OpenMP thread count of the child from its start; ``env`` adds
    environment variables (e.g. ``STEADY_MALLOC_ENV`` for memory measurements)."""
    runner = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('_bench_child', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "result = getattr(module, sys.argv[2])(**json.loads(sys.argv[3]))\n"
        "print('@@RESULT@@' + json.dumps(result))\n"
    )
    child_env = {**os.environ, **(env or {})}
    if threads is not None:
        child_env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    completed = subprocess.run(
        [sys.executable, "-c", runner, str(script), function, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        check=False,  # a failing child is reported below, with its stderr
    )
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    raise RuntimeError(
        f"{function}({kwargs}) in a fresh process failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
    )


# ---- reporting -------------------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Where the numbers come from: versions, threads, CPU, and how busy the machine was."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) and abs(value) < 10 else (
            f"{value:.0f}" if isinstance(value, float) else str(value)
        )

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, markdown: str, data: dict[str, Any], directory: Path = RESULTS_DIR) -> list[Path]:
    """Save ``<directory>/<name>.md`` and ``<name>.json`` (``data`` gets the environment added)."""
    directory.mkdir(parents=True, exist_ok=True)
    md_path, json_path = directory / f"{name}.md", directory / f"{name}.json"
    md_path.write_text(markdown.rstrip() + "\n")
    json_path.write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    return [md_path, json_path]


def bar_plot(
    path: Path,
    groups: list[str],
    panels: list[tuple[str, dict[str, list[float]]]],
    title: str,
    reference_line: float | None = None,
) -> Path:
    """Grouped bars, one panel per ``(y label, {series: one value per group})``; ``reference_line`` draws a dashed
    horizontal line (1.0 for ratio panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, (ylabel, series) in zip(axes[0], panels, strict=True):
        width = 0.8 / max(len(series), 1)
        for index, (label, values) in enumerate(series.items()):
            positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
            bars = axis.bar(positions, values, width, label=label)
            axis.bar_label(bars, fmt="%.2f" if "ratio" in ylabel.lower() else "%.0f", fontsize=6, rotation=90,
                           padding=2)
        if reference_line is not None and "ratio" in ylabel.lower():
            axis.axhline(reference_line, color="black", linestyle="--", linewidth=1)
        axis.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel(ylabel)
        axis.margins(y=0.15)  # room for the rotated value labels
        axis.legend(fontsize=8, loc="lower right" if "ratio" in ylabel.lower() else "upper left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "MALLOC_CHOICES",
    "MALLOC_HELP",
    "RESULTS_DIR",
    "STEADY_MALLOC_ENV",
    "THP_MALLOC_ENV",
    "bar_plot",
    "current_rss_mib",
    "environment",
    "interleaved_timings",
    "markdown_table",
    "median_ms",
    "peak_rss_mib",
    "release_freed_memory",
    "reset_peak_rss",
    "run_in_fresh_process",
    "write_results",
]
