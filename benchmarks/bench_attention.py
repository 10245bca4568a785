"""One attention layer (or one whole encoder) at growing sequence lengths: time and peak memory, against peers
measured in the same run.

Cases come from ``benchmarks/cases_*.py``: every such module exposes ``CASES``, a list of ``Case`` (defined here;
``from bench_attention import Case``). A case builds, for one sequence length and one mode, a zero-argument step:

- ``mode="fwd"``: a forward under ``torch.no_grad()``; ``"fwd+bwd"``: forward and backward of ``out.sum()``;
  ``"train"``: a whole model's training step (whole-encoder cases).
- ``group`` puts cases side by side in one table ("attention": one layer, batch 1, 8 heads of 64, fp32;
  "encoder": a whole encoder); ``reference=True`` marks the case every ratio column divides by, and ``peers`` the
  cases the summary compares ours with.

Every (case, length, mode) runs in a fresh Python (``common.run_in_fresh_process``) with one torch thread, so that its
peak memory is its own: the RSS high-water mark is reset once the case's module is imported, so the peak covers the
inputs, the module and the work (as our peer figures count them). Case modules therefore import their libraries at the
top, not in ``build``. glibc's default allocator settings are kept (``STEADY_MALLOC_ENV`` would make every large
allocation a fresh mmap, and its page faults would penalise the peers that allocate per step). Time: median of the repeats after one warm-up; both wall-clock
and the process's CPU time are recorded. On a shared machine the CPU time (``time.process_time``, which with one
thread is the wall time of an idle machine) is what the ratios use; the wall times are in the JSON. Cases at one
length run one after the other, in alternating order, so drift in the machine's speed hits them alike.

Also reported: the machine's measured fp32 matmul rate (a 2048² GEMM, 1 thread), each case's useful FLOP/s where it
declares its useful work (``Case.flops``) and that as a fraction of the matmul rate, and time(2N)/time(N) for
each pair of lengths and as fitted over all lengths from 2048 up (``fitted_doubling``).

    python benchmarks/bench_attention.py                                  # everything (long: dense SDPA at 16k)
    python benchmarks/bench_attention.py --sizes 1024 2048 --modes fwd --cases banded sdpa --output scratch
    python benchmarks/bench_attention.py --modules sliding      # the cases of cases_sliding.py only
    python benchmarks/bench_attention.py --list
    python benchmarks/bench_attention.py --malloc reuse ...           # heap reuse: no page faults of >= 32 MiB blocks
    python benchmarks/bench_attention.py --rounds 3 ...               # the whole sweep 3 times, medians of the rounds

Rounds: one fresh process per (case, length, mode) gives one cell, and on a shared machine a cell moves by several
percent between processes (where the allocator and the OS place its memory, neighbours' load), so one run's
time(2N)/time(N) moves by about ±0.2. ``--rounds R`` repeats the whole sweep R times (each round visits every length,
so drift hits all lengths alike), takes each cell's median over the rounds, and prints the range of the per-round
ratios beside the ratio of the medians.

Results: ``benchmarks/results/<output>.{md,json,png}`` (default ``bench_attention``).
"""

# no `from __future__ import annotations`: this file is also loaded by `run_in_fresh_process` as an unregistered
# module, where a dataclass cannot resolve string annotations
import argparse
import importlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # `common` and the case modules beside this file

from common import (
    MALLOC_CHOICES,
    MALLOC_HELP,
    RESULTS_DIR,
    current_rss_mib,
    markdown_table,
    peak_rss_mib,
    release_freed_memory,
    reset_peak_rss,
    run_in_fresh_process,
    write_results,
)

SIZES = (1024, 2048, 4096, 8192, 16384)
FIT_FROM = 2048  # the scaling fit starts here (the goals' "from 2048 up"; 1k steps are dominated by fixed costs)
MODES = ("fwd", "fwd+bwd")


@dataclass
class Case:
    """One thing to measure. ``build(n, mode)`` returns the step to time (it may allocate inputs: they count in the
    peak memory). ``flops(n, mode)``: the useful work of one step (for the efficiency column), or None."""

    name: str
    build: Callable[[int, str], Callable[[], object]]
    group: str = "attention"
    sizes: tuple[int, ...] = SIZES
    modes: tuple[str, ...] = MODES
    flops: Callable[[int, str], float] | None = None
    reference: bool = False
    ours: bool = False
    note: str = ""
    timeout: float = 1800.0
    extra: dict = field(default_factory=dict)


def discover(pattern: str = "cases_*.py") -> list[tuple[str, Case]]:
    """(module name, case) for every case in every ``cases_*.py`` beside this file."""
    found = []
    for path in sorted(HERE.parent.glob(pattern)):
        module = importlib.import_module(path.stem)
        for case in getattr(module, "CASES", []):
            found.append((path.stem, case))
    return found


def measure(module: str, case: str, n: int, mode: str, repeats: int) -> dict:
    """Runs in the fresh child process: build, one warm-up, ``repeats`` timed steps; peak RSS since torch import."""
    import torch

    torch.set_num_threads(1)
    chosen = next(c for c in importlib.import_module(module).CASES if c.name == case)
    release_freed_memory()
    reset_peak_rss()
    start_rss = current_rss_mib()
    step = chosen.build(n, mode)
    step()  # warm-up (and compilation, for compiled cases)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {
        "cpu_ms": 1000 * statistics.median(cpu),
        "wall_ms": 1000 * statistics.median(wall),
        "peak_mib": peak_rss_mib() - start_rss,
        "repeats": repeats,
    }


def matmul_rate() -> dict:
    """The machine's fp32 GEMM rate on one thread (2048³, median of 5, CPU time): the efficiency yardstick."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.process_time()
        a @ b
        times.append(time.process_time() - start)
    return {"gflops": 2 * 2048**3 / statistics.median(times) / 1e9}


def repeats_for(seconds_hint: float | None, default: int) -> int:
    """Fewer repeats for steps that take long (dense attention at 16k takes tens of seconds)."""
    if seconds_hint is None:
        return default
    return max(1, min(default, int(30 // max(seconds_hint, 1e-3))))


def run(cases, sizes, modes, repeats, verbose=True, env=None) -> list[dict]:
    rows = []
    last_time: dict[tuple[str, str], float] = {}
    for n in sizes:
        for mode in modes:
            todo = [(m, c) for m, c in cases if n in c.sizes and mode in c.modes]
            if (n // 1024) % 2:  # alternate the order between lengths
                todo = todo[::-1]
            for module, case in todo:
                hint = last_time.get((case.name, mode))
                count = repeats_for(None if hint is None else hint * 2.2, repeats)
                try:
                    result = run_in_fresh_process(
                        HERE, "measure",
                        {"module": module, "case": case.name, "n": n, "mode": mode, "repeats": count},
                        timeout=case.timeout, threads=1, env=env,
                    )
                except Exception as error:  # noqa: BLE001 - a failing or timed-out peer is reported, not fatal
                    result = {"error": str(error).strip().splitlines()[-1][:200] if str(error).strip() else "failed"}
                result.update(case=case.name, group=case.group, n=n, mode=mode)
                if "cpu_ms" in result:
                    last_time[(case.name, mode)] = result["cpu_ms"] / 1000
                    if case.flops is not None:
                        result["useful_gflops"] = case.flops(n, mode) / (result["cpu_ms"] / 1000) / 1e9
                rows.append(result)
                if verbose:
                    shown = (f"{result['cpu_ms']:.0f} ms cpu / {result['wall_ms']:.0f} ms wall / "
                             f"{result['peak_mib']:.0f} MiB" if "cpu_ms" in result else result["error"])
                    print(f"{case.group:9s} {mode:7s} N={n:6d} {case.name:38s} {shown}", flush=True)
    return rows


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (case, length, mode) from the rows of several rounds: the median CPU and wall time and peak
    memory over the rounds that measured it, with every round's values under ``*_rounds``. A cell that failed in
    every round keeps the first round's error."""
    if len(rounds) == 1:
        return rounds[0]
    cells: dict[tuple, list[dict]] = {}
    for rows in rounds:
        for row in rows:
            cells.setdefault((row["case"], row["n"], row["mode"]), []).append(row)
    combined = []
    for measured in cells.values():
        good = [r for r in measured if "cpu_ms" in r]
        if not good:
            combined.append(measured[0])
            continue
        row = dict(good[0])
        for key in ("cpu_ms", "wall_ms", "peak_mib", "useful_gflops"):
            if key in row:
                values = [r[key] for r in good]
                row[key], row[f"{key}_rounds"] = statistics.median(values), values
        row["rounds"] = len(good)
        combined.append(row)
    return combined


def scaling_cell(r: dict | None, half: dict | None) -> str:
    """time(N)/time(N/2) of two combined rows, with the range of the per-round ratios when there were rounds."""
    if not (r and half and "cpu_ms" in r and "cpu_ms" in half):
        return "-"
    text = f"{r['cpu_ms'] / half['cpu_ms']:.2f}"
    full, halves = r.get("cpu_ms_rounds"), half.get("cpu_ms_rounds")
    if full and halves and len(full) == len(halves):
        ratios = [a / b for a, b in zip(full, halves)]
        text += f" (rounds {min(ratios):.2f}-{max(ratios):.2f})"
    return text


def fitted_doubling(points: list[tuple[int, float]]) -> float | None:
    """2 to the least-squares slope of log2(time) against log2(N): the time(2N)/time(N) that best fits all lengths
    at once. A single ratio divides two noisy cells (each moves by several percent between processes on a shared
    machine); the fit uses every cell, so one slow or fast cell moves it much less."""
    if len(points) < 3:
        return None
    xs, ys = [math.log2(n) for n, _ in points], [math.log2(t) for _, t in points]
    return 2 ** statistics.linear_regression(xs, ys).slope


def report(cases, rows, rate, sizes, modes) -> tuple[str, dict]:
    """Markdown: per group and mode a table of ms / MiB per length, ratios against the reference case, scaling of
    our cases, and their efficiency."""
    by_key = {(r["case"], r["n"], r["mode"]): r for r in rows}
    lines = [(f"Machine fp32 matmul rate (1 thread, 2048³): {rate:.1f} GFLOP/s. Times are CPU-time medians (ms); "
              "memory is the peak RSS increase of a fresh process (MiB)."), ""]
    groups = list(dict.fromkeys(c.group for _, c in cases))
    for group in groups:
        members = [c for _, c in cases if c.group == group]
        reference = next((c for c in members if c.reference), None)
        for mode in modes:
            present = [c for c in members if mode in c.modes]
            lengths = [n for n in sizes if any((c.name, n, mode) in by_key for c in present)]
            if not present or not lengths:
                continue
            lines.append(f"### {group}, {mode}")
            table = []
            for case in present:
                cells = []
                for n in lengths:
                    r = by_key.get((case.name, n, mode))
                    cells.append("-" if r is None else (r.get("error", "failed")[:40] if "cpu_ms" not in r
                                                         else f"{r['cpu_ms']:.0f} / {r['peak_mib']:.0f}"))
                table.append([case.name + (" (ours)" if case.ours else "")] + cells)
            lines += [markdown_table(["case (ms / MiB)"] + [str(n) for n in lengths], table), ""]
            if reference is not None:
                ratio_rows = []
                for case in present:
                    if case is reference:
                        continue
                    cells = []
                    for n in lengths:
                        a, b = by_key.get((case.name, n, mode)), by_key.get((reference.name, n, mode))
                        ok = a and b and "cpu_ms" in a and "cpu_ms" in b
                        cells.append(f"{b['cpu_ms'] / a['cpu_ms']:.2f}x" if ok else "-")
                    ratio_rows.append([case.name] + cells)
                lines += [f"Speed-up over {reference.name} (its time / case time):", "",
                          markdown_table(["case"] + [str(n) for n in lengths], ratio_rows), ""]
            ours = [c for c in present if c.ours]
            for case in ours:
                scaling, efficiency = [], []
                for n in lengths:
                    r, half = by_key.get((case.name, n, mode)), by_key.get((case.name, n // 2, mode))
                    scaling.append(scaling_cell(r, half))
                    useful = r.get("useful_gflops") if r else None
                    efficiency.append(f"{useful:.1f} ({100 * useful / rate:.0f}%)" if useful else "-")
                points = [(n, by_key[(case.name, n, mode)]["cpu_ms"]) for n in lengths
                          if n >= FIT_FROM and "cpu_ms" in by_key.get((case.name, n, mode), {})]
                fit = fitted_doubling(points)
                fitted = (f"; fitted over {points[0][0]}-{points[-1][0]}: {fit:.2f} per doubling"
                          if fit is not None else "")
                lines += [f"{case.name}: time(N)/time(N/2): " + ", ".join(f"{n}: {s}" for n, s in zip(lengths, scaling))
                          + fitted,
                          "",
                          f"{case.name}: useful GFLOP/s (share of the matmul rate): "
                          + ", ".join(f"{n}: {e}" for n, e in zip(lengths, efficiency)), ""]
    data = {"matmul_gflops": rate, "rows": rows,
            "cases": {c.name: {"group": c.group, "note": c.note, "ours": c.ours, "reference": c.reference}
                      for _, c in cases}}
    return "\n".join(lines), data


def plot(path: Path, cases, rows, modes) -> None:
    """One row of panels per group measured at several lengths: time per mode (log-log) and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in dict.fromkeys(c.group for _, c in cases)
              if len({r["n"] for r in rows if r["group"] == g and r["mode"] in modes}) > 1]
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), len(modes) + 1, figsize=(5.5 * (len(modes) + 1), 4.5 * len(groups)),
                             squeeze=False)
    for line, group in zip(axes, groups):
        members = [c for _, c in cases if c.group == group]
        panels = [(mode, "cpu_ms", "ms (CPU time)") for mode in modes] + [(modes[-1], "peak_mib", "peak MiB")]
        for axis, (mode, key, label) in zip(line, panels):
            for case in members:
                points = sorted((r["n"], r[key]) for r in rows
                                if r["case"] == case.name and r["mode"] == mode and key in r)
                if points:
                    axis.plot(*zip(*points), marker="o", label=case.name, linewidth=2.5 if case.ours else 1.2)
            title = f"{group}: {mode}" + (" (memory)" if key == "peak_mib" else "")
            axis.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label, title=title)
            axis.legend(fontsize=7)
    fig.suptitle("One attention layer, batch 1, 8 heads x 64, fp32, 1 thread")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=[*MODES, "train"])
    parser.add_argument("--cases", nargs="+", default=None, help="substrings of case names to keep")
    parser.add_argument("--modules", nargs="+", default=None, help="substrings of case-module names to keep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole sweep this many times; cells are the medians over the rounds")
    parser.add_argument("--output", default="bench_attention")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--malloc", choices=tuple(MALLOC_CHOICES), default="default", help=MALLOC_HELP)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: need at least 1")
    env = MALLOC_CHOICES[args.malloc]
    cases = discover()
    if args.modules:
        cases = [(m, c) for m, c in cases if any(s in m for s in args.modules)]
    if args.cases:
        cases = [(m, c) for m, c in cases if any(s.lower() in c.name.lower() for s in args.cases)]
    if args.list:
        for module, case in cases:
            print(f"{module:20s} {case.group:9s} {case.name:38s} modes={case.modes} sizes={case.sizes} {case.note}")
        return 0
    rate = run_in_fresh_process(HERE, "matmul_rate", {}, threads=1)["gflops"]
    print(f"fp32 matmul rate, 1 thread: {rate:.1f} GFLOP/s", flush=True)
    rounds = []
    for index in range(args.rounds):
        if args.rounds > 1:
            print(f"round {index + 1} of {args.rounds}", flush=True)
        rounds.append(run(cases, args.sizes, args.modes, args.repeats, env=env))
    rows = combine_rounds(rounds)
    modes = [m for m in args.modes if any(r["mode"] == m for r in rows)]
    markdown, data = report(cases, rows, rate, args.sizes, modes)
    if args.rounds > 1:
        markdown = (f"Rounds: {args.rounds} (the whole sweep, one after the other); every cell is the median over the "
                    "rounds, and each time(N)/time(N/2) is followed by the range of the rounds' own ratios.\n\n"
                    + markdown)
        data["rounds"] = args.rounds
    if env:
        markdown = (f"Allocator: heap reuse without mmap ({' '.join(f'{k}={v}' for k, v in env.items())}).\n\n"
                    + markdown)
        data["malloc_env"] = env
    print("\n" + markdown)
    write_results(args.output, markdown, data)
    plot_modes = [m for m in modes if m != "train"] or modes
    plot(RESULTS_DIR / f"{args.output}.png", cases, rows, plot_modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
