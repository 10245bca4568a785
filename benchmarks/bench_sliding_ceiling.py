"""How close can the banded kernel's torch-ops path get to the machine's matmul rate? Its per-block pipeline, op by op.

The torch-ops path (``_BandedCore``, the fallback where the native C kernel cannot be built) runs each op over a chunk
of many query blocks. The native C kernel (``attention_sliding_native.py``) runs the same ops one block at a time,
without Python, copies or a chunk-sized working set between them; its measured share is printed beside the torch
path's, as what removing those costs gave.

``bench_attention.py`` reports the kernel's useful FLOP/s as a share of a large GEMM's rate (the issue's goal is 50%
at N >= 4096). This script times, on in-cache data shaped like one chunk of the kernel (``CHUNK_BYTES`` of scores,
blocks of ``default_block_size`` queries, window 512, head dim 64, 1 thread), each op the kernel runs per block:

- forward: scores q·kᵀ (bmm), softmax, probabilities·v (bmm);
- backward: the forward's scores and softmax again (nothing N·w is saved), dP = dO·vᵀ, the softmax backward,
  dQ = dS·k, and dK += dSᵀ·q, dV += Pᵀ·dO, one addmm per window (windows overlap, see ``_overlap_add_``).

The sum of these op times is the kernel's *ceiling*: what it would take with no Python, no copies and no cache misses
between ops. Dividing the band's useful work (``cases_sliding.band_flops``) by it gives the best share of the matmul
rate this op structure can reach; the kernel's measured share at 4096 tokens is printed next to it. Writes
``results/bench_sliding_ceiling.{md,json}``.

    python benchmarks/bench_sliding_ceiling.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_attention import matmul_rate
from cases_sliding import HALF, HEAD_DIM, HEADS, WINDOW, band_flops
from common import environment, markdown_table, write_results

from hf_xarch.model.attention_sliding_kernels import CHUNK_BYTES, banded_attention, default_block_size
from hf_xarch.model.attention_sliding_native import native_kernel, native_kernel_error


def seconds(fn, repeats: int) -> float:
    """Median CPU seconds of one call (after a warm-up of 10 calls)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def op_times(block: int, repeats: int) -> dict[str, float]:
    """Seconds per query block of each op of the kernel, on one chunk's worth of blocks."""
    span, dim = block + 2 * HALF, HEAD_DIM
    blocks = max(1, CHUNK_BYTES // (block * span * 4))
    keys = torch.randn(blocks * block + span, dim)
    key_t = keys.T.contiguous()
    k_windows = keys.unfold(0, span, block).transpose(1, 2)[:blocks]  # (blocks, span, D) views, as in the kernel
    kt_windows = key_t.unfold(1, span, block).transpose(0, 1)[:blocks]  # (blocks, D, span)
    q, d_out = torch.randn(blocks, block, dim), torch.randn(blocks, block, dim)
    scores, probs = torch.randn(blocks, block, span), torch.softmax(torch.randn(blocks, block, span), -1)
    out = torch.empty(blocks, block, dim)
    grad_keys = torch.zeros_like(keys)
    grad_windows = grad_keys.unfold(0, span, block).transpose(1, 2)

    def window_adds():
        for c in range(blocks):
            grad_windows[c].addmm_(probs[c].T, d_out[c])

    ops = {
        "q·kᵀ": lambda: torch.bmm(q, kt_windows, out=scores),
        "softmax": lambda: torch._softmax(scores, -1, False, out=scores),
        "P·v": lambda: torch.bmm(probs, k_windows, out=out),
        "softmax backward": lambda: torch.ops.aten._softmax_backward_data.out(
            scores, probs, -1, probs.dtype, grad_input=scores),
        "dK or dV (per-window addmm)": window_adds,
    }
    return {name: seconds(fn, repeats) / blocks for name, fn in ops.items()}


def kernel_share(n: int, rate: float, repeats: int, native: bool) -> dict[str, float]:
    """The kernel's measured useful GFLOP/s share at ``n`` tokens, forward and forward + backward: the torch-ops
    path whose op structure this script times, or (``native``) the C kernel."""
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=True) for _ in range(3))

    def forward():
        with torch.no_grad():
            banded_attention(q, k, v, HALF, HALF, [1] * HEADS, HEAD_DIM**-0.5, native=native)

    def forward_backward():
        banded_attention(q, k, v, HALF, HALF, [1] * HEADS, HEAD_DIM**-0.5, native=native).sum().backward()

    return {mode: band_flops(n, mode) / seconds(fn, repeats) / 1e9 / rate
            for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--n", type=int, default=4096, help="sequence length of the whole-kernel measurement")
    parser.add_argument("--output", default="bench_sliding_ceiling")
    args = parser.parse_args(argv)
    rate = matmul_rate()["gflops"]  # the yardstick bench_attention.py uses (sets 1 thread)
    block = default_block_size(HALF, HALF)
    ops = op_times(block, args.repeats)
    forward = ops["q·kᵀ"] + ops["softmax"] + ops["P·v"]
    # the backward: scores and softmax again, dP (a q·kᵀ shape), the softmax backward, dQ (a P·v shape), dK and dV
    backward = (2 * ops["q·kᵀ"] + ops["softmax"] + ops["softmax backward"] + ops["P·v"]
                + 2 * ops["dK or dV (per-window addmm)"])
    per_block = {"fwd": forward, "fwd+bwd": forward + backward}
    useful = {mode: band_flops(block, mode) / HEADS for mode in per_block}  # one block of one head
    measured = kernel_share(args.n, rate, max(3, args.repeats // 10), native=False)
    native = kernel_share(args.n, rate, max(3, args.repeats // 10), native=True) if native_kernel() else None
    rows = [[name, f"{1e6 * t:.1f}", f"{2 * block * (WINDOW + block) * HEAD_DIM / t / 1e9:.0f}"
             if "softmax" not in name else "-"] for name, t in ops.items()]
    lines = [(f"Machine fp32 matmul rate (1 thread, 2048³): {rate:.1f} GFLOP/s. Block {block} queries, window "
             f"{WINDOW} ({block + 2 * HALF} keys per block), head dim {HEAD_DIM}, {CHUNK_BYTES >> 10} KiB of scores "
             "per chunk."), "", markdown_table(["op (per block)", "µs", "GFLOP/s"], rows), ""]
    summary = []
    for mode, t in per_block.items():
        ceiling = useful[mode] / t / 1e9 / rate
        summary.append([mode, f"{1e6 * t:.1f}", f"{ceiling:.0%}", f"{measured[mode]:.0%}",
                        f"{native[mode]:.0%}" if native else f"- ({native_kernel_error()})"])
    lines += [markdown_table(["mode", "op-time sum per block (µs)", "ceiling share of the matmul rate",
                              f"torch-ops kernel's measured share at {args.n}",
                              f"native C kernel's measured share at {args.n}"], summary)]
    markdown = "\n".join(lines)
    print(markdown)
    write_results(args.output, markdown, {"matmul_gflops": rate, "block": block, "ops_us": {
        k: 1e6 * v for k, v in ops.items()}, "per_block_us": {k: 1e6 * v for k, v in per_block.items()},
        "measured_share": measured, "native_share": native, "environment": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
