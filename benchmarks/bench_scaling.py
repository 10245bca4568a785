"""How our attention cases scale with the sequence length, measured so that the machine's drift cancels.

``bench_attention.py`` measures every (case, length, mode) in its own fresh process, one after the other, which is
right for peak memory and for comparing peers at one length. For time(2N)/time(N) it is noisy here: the machine's
speed changes under its neighbours' load (one process's repeats spread by ±15%), so two cells measured minutes apart
differ by several percent for reasons that have nothing to do with N. This script builds one case's steps at every
length in **one** process and runs them in turns (1k, 2k, ..., 16k, then back down, ``--rounds`` times): a slow
minute slows every length alike, and each length's median is taken over the same stretch of time.

The allocator is shared by the lengths too, like in a real program: the short steps' freed blocks are there for the
long ones (a fresh process that only ever frees small and >= 32 MiB blocks keeps glibc's trimming thresholds low,
which a training job does not; see the README's allocator paragraph).

Reports, per case and mode: each length's median CPU time, time(N)/time(N/2), the fitted time(2N)/time(N) over
2048 and up (``bench_attention.fitted_doubling``), and a plot of the time per token (flat = linear). Cases that
declare their useful work also get it as a share of the machine's matmul rate, the rate measured in the same process
between the passes (so a slow stretch of the machine lowers both alike).

    python benchmarks/bench_scaling.py                                   # our attention cases (xarch*), fwd and fwd+bwd
    python benchmarks/bench_scaling.py --cases "xarch performer" --rounds 5 --output scratch_scaling
    python benchmarks/bench_scaling.py --cases "xarch banded" --malloc thp --output scratch_thp   # huge pages

Results: ``benchmarks/results/<output>.{md,json,png}`` (default ``bench_scaling``).
"""

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

# matmul_rate runs in a child that loads this file by path (run_in_fresh_process), so it must be importable from here
from bench_attention import FIT_FROM, MODES, SIZES, discover, fitted_doubling, matmul_rate  # noqa: F401
from common import MALLOC_CHOICES, MALLOC_HELP, RESULTS_DIR, markdown_table, run_in_fresh_process, write_results

MATMUL_SIZE = 2048  # the yardstick of bench_attention.matmul_rate


def measure_interleaved(module: str, case: str, sizes: list[int], mode: str, rounds: int) -> dict:
    """Runs in a fresh child: the case's step at every length, one warm-up each, then ``rounds`` passes over the
    lengths (ascending, then descending, alternately), each pass after one 2048³ matmul (the efficiency yardstick,
    measured in the same stretch of time as the steps). Returns the CPU milliseconds of every step, per length, and
    of every matmul."""
    import torch

    torch.set_num_threads(1)
    chosen = next(c for c in importlib.import_module(module).CASES if c.name == case)
    steps = {n: chosen.build(n, mode) for n in sizes}
    for step in steps.values():
        step()
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    a @ b
    times: dict[int, list[float]] = {n: [] for n in sizes}
    matmul_ms = []
    for index in range(rounds):
        start = time.process_time()
        a @ b
        matmul_ms.append(1000 * (time.process_time() - start))
        for n in sizes if index % 2 == 0 else sizes[::-1]:
            start = time.process_time()
            steps[n]()
            times[n].append(1000 * (time.process_time() - start))
    return {"cpu_ms": {str(n): t for n, t in times.items()}, "matmul_ms": matmul_ms}


def share_cells(case, mode: str, record: dict, matmul_ms: list[float], columns: list[int]) -> list[str]:
    """The case's useful FLOP/s at each of ``columns`` as a share of the matmul rate of the same passes (medians of
    both; "-" where the case has no such length)."""
    rate = 2 * MATMUL_SIZE**3 / (statistics.median(matmul_ms) / 1000)
    record["matmul_gflops"] = rate / 1e9
    record["share"] = {n: case.flops(n, mode) / (ms / 1000) / rate for n, ms in record["median_ms"].items()}
    return [f"{rate / 1e9:.0f}"] + [f"{100 * record['share'][n]:.0f}%" if n in record["share"] else "-"
                                    for n in columns]


def summarise(name: str, mode: str, times: dict[int, list[float]], columns: list[int]) -> tuple[list[str], dict]:
    """Table row cells (median ms at each of ``columns``, then time(N)/time(N/2) for each of them whose half is a
    column too, then the fit; "-" where this case has no such length) and the JSON record of one case and mode."""
    sizes = sorted(times)
    medians = {n: statistics.median(times[n]) for n in sizes}
    ratios = {n: medians[n] / medians[n // 2] for n in sizes if n // 2 in medians}
    fit = fitted_doubling([(n, medians[n]) for n in sizes if n >= FIT_FROM])
    record = {"case": name, "mode": mode, "median_ms": medians, "ratios": ratios, "fitted": fit, "cpu_ms": times}
    cells = [f"{medians[n]:.1f}" if n in medians else "-" for n in columns]
    cells += [f"{ratios[n]:.2f}" if n in ratios else "-" for n in columns if n // 2 in columns]
    return [*cells, f"{fit:.2f}" if fit is not None else "-"], record


def plot(path: Path, records: list[dict]) -> None:
    """Time per token against N, one panel per mode: a linear method draws a flat line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in records))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.3), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        for record in (r for r in records if r["mode"] == mode):
            sizes = sorted(record["median_ms"])
            axis.plot(sizes, [1000 * record["median_ms"][n] / n for n in sizes], marker="o", label=record["case"])
        axis.set(xscale="log", xlabel="sequence length", ylabel="µs per token (CPU time)",
                 title=f"{mode}: time per token (flat = linear)")
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--cases", nargs="+", default=["xarch"], help="substrings of case names to keep")
    parser.add_argument("--rounds", type=int, default=9, help="passes over the lengths (each step once per pass)")
    parser.add_argument("--output", default="bench_scaling")
    parser.add_argument("--malloc", choices=tuple(MALLOC_CHOICES), default="default", help=MALLOC_HELP)
    args = parser.parse_args(argv)
    env = MALLOC_CHOICES[args.malloc]
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: need at least 1")
    sizes = sorted(args.sizes)
    cases = [(m, c) for m, c in discover() if c.ours and any(s.lower() in c.name.lower() for s in args.cases)]
    if not cases:
        parser.error(f"--cases {args.cases}: no case of ours matches")
    rate = run_in_fresh_process(HERE, "matmul_rate", {}, threads=1)["gflops"]
    print(f"fp32 matmul rate, 1 thread: {rate:.1f} GFLOP/s", flush=True)
    rows, records, shares = [], [], []
    for mode in args.modes:
        for module, case in cases:
            lengths = [n for n in sizes if n in case.sizes]
            if mode not in case.modes or len(lengths) < 2:
                continue
            arguments = {"module": module, "case": case.name, "sizes": lengths, "mode": mode, "rounds": args.rounds}
            result = run_in_fresh_process(HERE, "measure_interleaved", arguments, threads=1,
                                          timeout=case.timeout * args.rounds, env=env)
            times = {int(n): t for n, t in result["cpu_ms"].items()}
            cells, record = summarise(case.name, mode, times, sizes)
            records.append(record)
            rows.append([case.name, mode, *cells])
            if case.flops is not None:
                shares.append([case.name, mode, *share_cells(case, mode, record, result["matmul_ms"], sizes)])
            print(f"{mode:7s} {case.name:40s} " + " ".join(cells), flush=True)
    header = (["case", "mode"] + [f"{n} ms" for n in sizes] + [f"{n}/{n // 2}" for n in sizes if n // 2 in sizes]
              + [f"fitted ({FIT_FROM}+)"])
    intro = (f"Machine fp32 matmul rate (1 thread, 2048³): {rate:.1f} GFLOP/s. One process per case and mode; its "
             f"steps at every length run in turns, {args.rounds} passes (up, down, up, ...); CPU-time medians (ms), "
             f"time(N)/time(N/2), and the time(2N)/time(N) fitted over all lengths from {FIT_FROM} up. Allocator: "
             f"{args.malloc} ({env or 'glibc defaults'}).")
    markdown = "\n".join([intro, "", markdown_table(header, rows)])
    if shares:
        share_intro = ("Useful FLOP/s (the case's declared useful work over its median time) as a share of the matmul "
                       "rate measured in the same passes (one 2048³ matmul before each pass, median):")
        share_table = markdown_table(["case", "mode", "matmul GFLOP/s"] + [str(n) for n in sizes], shares)
        markdown += f"\n\n{share_intro}\n\n{share_table}"
    print("\n" + markdown)
    write_results(args.output, markdown, {"matmul_gflops": rate, "rounds": args.rounds, "malloc_env": env,
                                          "records": records})
    plot(RESULTS_DIR / f"{args.output}.png", records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
