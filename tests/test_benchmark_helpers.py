"""The statistics ``benchmarks/bench_attention.py`` reports: medians over rounds and the fitted scaling factor."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_attention


@pytest.mark.parametrize("exponent", [1.0, 1.13, 2.0])
def test_fitted_doubling_recovers_a_power_law(exponent):
    sizes = [2048, 4096, 8192, 16384]
    points = [(n, 3.0 * n**exponent) for n in sizes]
    assert bench_attention.fitted_doubling(points) == pytest.approx(2**exponent, rel=1e-12)


def test_fitted_doubling_is_less_moved_by_one_slow_cell_than_its_ratio():
    points = [(n, n / 1000) for n in (2048, 4096, 8192)] + [(16384, 16.384 * 1.15)]  # the last cell 15% slow
    last_ratio = points[-1][1] / points[-2][1]
    fit = bench_attention.fitted_doubling(points)
    assert last_ratio == pytest.approx(2.3)
    assert 2.0 < fit < 2.1
    assert bench_attention.fitted_doubling(points[:2]) is None  # two points: no fit


def test_combine_rounds_takes_medians_and_keeps_every_round():
    def row(case, n, cpu, peak):
        return {"case": case, "n": n, "mode": "fwd", "group": "g", "cpu_ms": cpu, "wall_ms": cpu + 1, "peak_mib": peak}

    rounds = [
        [row("a", 1024, 10.0, 5.0), row("a", 2048, 25.0, 9.0), {"case": "b", "n": 1024, "mode": "fwd", "error": "x"}],
        [row("a", 1024, 12.0, 6.0), row("a", 2048, 21.0, 9.0), {"case": "b", "n": 1024, "mode": "fwd", "error": "y"}],
        [row("a", 1024, 11.0, 4.0), row("a", 2048, 20.0, 8.0), row("b", 1024, 7.0, 1.0)],
    ]
    for index, rows in enumerate(rounds):  # a case that fails in every round keeps the first round's error
        rows.append({"case": "c", "n": 1024, "mode": "fwd", "error": f"failed {index}"})
    combined = {(r["case"], r["n"]): r for r in bench_attention.combine_rounds(rounds)}
    first = combined[("a", 1024)]
    assert (first["cpu_ms"], first["wall_ms"], first["peak_mib"]) == (11.0, 12.0, 5.0)
    assert first["cpu_ms_rounds"] == [10.0, 12.0, 11.0] and first["rounds"] == 3
    assert combined[("b", 1024)]["cpu_ms"] == 7.0 and combined[("b", 1024)]["rounds"] == 1  # failed rounds skipped
    assert combined[("c", 1024)] == {"case": "c", "n": 1024, "mode": "fwd", "error": "failed 0"}
    cell = bench_attention.scaling_cell(combined[("a", 2048)], first)
    ratios = [25 / 10, 21 / 12, 20 / 11]
    assert cell == f"{21 / 11:.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})"
    assert bench_attention.combine_rounds(rounds[:1]) is rounds[0]


def test_scaling_summary_of_interleaved_steps():
    import bench_scaling

    times = {1024: [10.0, 11.0, 30.0], 2048: [21.0, 20.0, 22.0], 4096: [40.0, 44.0, 41.0], 8192: [80.0, 90.0, 84.0]}
    cells, record = bench_scaling.summarise("case", "fwd", times, [1024, 2048, 4096, 8192])
    assert record["median_ms"] == {1024: 11.0, 2048: 21.0, 4096: 41.0, 8192: 84.0}  # the 30 ms outlier is ignored
    assert record["ratios"] == {2048: 21 / 11, 4096: 41 / 21, 8192: 84 / 41}
    assert record["fitted"] == pytest.approx(bench_attention.fitted_doubling([(2048, 21), (4096, 41), (8192, 84)]))
    assert cells[:4] == ["11.0", "21.0", "41.0", "84.0"] and cells[4] == f"{21 / 11:.2f}" and len(cells) == 8
    # columns this case lacks (and a column whose half is no column) stay aligned with "-"
    cells, _ = bench_scaling.summarise("case", "fwd", times, [1000, 1024, 2048, 16384])
    assert cells == ["-", "11.0", "21.0", "-", f"{21 / 11:.2f}", f"{record['fitted']:.2f}"]


def test_scaling_share_divides_useful_work_by_the_same_passes_matmul_rate():
    import bench_scaling

    case = bench_attention.Case("case", None, flops=lambda n, mode: 1e9 * n / 1024 * (3 if mode == "fwd+bwd" else 1))
    record = {"median_ms": {1024: 20.0, 2048: 50.0}}
    matmul_ms = [100.0, 80.0, 400.0]  # median 100 ms: 2·2048³ FLOP / 0.1 s
    cells = bench_scaling.share_cells(case, "fwd+bwd", record, matmul_ms, [1024, 2048, 4096])
    rate = 2 * 2048**3 / 0.1
    assert record["matmul_gflops"] == pytest.approx(rate / 1e9)
    assert record["share"] == {1024: pytest.approx(3e9 / 0.02 / rate), 2048: pytest.approx(6e9 / 0.05 / rate)}
    assert cells == [f"{rate / 1e9:.0f}", f"{100 * 3e9 / 0.02 / rate:.0f}%", f"{100 * 6e9 / 0.05 / rate:.0f}%", "-"]
