"""T5's relative position bias against ALiBi and no bias, one attention layer, forward + backward.

Layers of hidden 512, 8 heads x 64, batch 1, fp32, at N = 1024 and 4096 (``--n``): XArch's full attention (a
decoder: causal) and sliding-window attention (an encoder, window 512: the setting of issue 19's goal), each with
``position_embedding_type`` ``none`` (unbiased: transformers' SDPA / the banded kernel), ``alibi`` and
``t5_relative``. The bias module runs inside the timed step (as the model computes it once per forward) and the
step's loss reaches the T5 table, so its gradient is part of the time. Candidates of one family are interleaved in
one process (``common.interleaved_timings``); the ratios are to the same family without a bias in the same run.

    python benchmarks/bench_t5_bias.py                       # 1k and 4k, 3 repeats
    python benchmarks/bench_t5_bias.py --n 1024 --repeats 2 --output scratch
    python benchmarks/bench_t5_bias.py --n 4096 16384 --families sliding_window   # the goal's length, band only
    python benchmarks/bench_t5_bias.py --n 4096 16384 --families sliding_window --threads 1 --cpu-time  # loaded host
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from common import environment, interleaved_timings, markdown_table, median_ms, write_results

SCHEMES = ("none", "alibi", "t5_relative")
FAMILIES = {"full": {"is_decoder": True}, "sliding_window": {"is_decoder": False, "attention_window": 512}}


def build(family: str, scheme: str, hidden: int, heads: int, seq: int):
    """One attention layer and the bias module that feeds it (None without a bias), seeded alike."""
    from hf_xarch import XArchConfig
    from hf_xarch.model.registry import ATTENTION_MODULES, POSITION_MODULES

    config = XArchConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=1, attention_type=family,
                         position_embedding_type=scheme, max_position_embeddings=seq, **FAMILIES[family])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = ATTENTION_MODULES[family](config, 0)
    positions = POSITION_MODULES[scheme](config) if scheme != "none" else None
    return layer, positions


def step(layer, positions, hidden_states: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    if positions is not None:
        positions.zero_grad(set_to_none=True)
    hidden_states.grad = None
    seq = hidden_states.shape[1]
    bias = positions(hidden_states, torch.arange(seq)[None]) if positions is not None else None
    mask = None
    if hasattr(layer, "build_mask"):
        mask = layer.build_mask(layer.config, hidden_states, None, None, torch.arange(seq)[None])
    output, _ = layer(hidden_states, mask, None, score_bias=bias)
    output.square().mean().backward()


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for seq in args.n:
        hidden_states = torch.randn(1, seq, args.hidden, generator=torch.Generator().manual_seed(4)).requires_grad_()
        for family in args.families:
            candidates = {scheme: functools.partial(step, *build(family, scheme, args.hidden, args.heads, seq),
                                                    hidden_states) for scheme in SCHEMES}
            times = interleaved_timings(candidates, repeats=args.repeats, warmup=args.warmup,
                                        clock=time.process_time if args.cpu_time else time.perf_counter)
            ms = {scheme: median_ms(times[scheme]) for scheme in SCHEMES}
            row = {"n": seq, "family": family, **{f"{s}_ms": ms[s] for s in SCHEMES},
                   "alibi_ratio": ms["alibi"] / ms["none"], "t5_ratio": ms["t5_relative"] / ms["none"],
                   "t5_vs_alibi": ms["t5_relative"] / ms["alibi"], "times_s": times}
            rows.append(row)
            print(f"N {seq:5d} {family:14s}: none {ms['none']:.0f} ms, alibi {ms['alibi']:.0f} ms "
                  f"(x{row['alibi_ratio']:.2f}), t5 {ms['t5_relative']:.0f} ms (x{row['t5_ratio']:.2f}; "
                  f"x{row['t5_vs_alibi']:.2f} of alibi)", flush=True)
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> None:
    env = environment()
    table = markdown_table(
        ["N", "family", "no bias ms", "ALiBi ms", "T5 ms", "ALiBi / none", "T5 / none", "T5 / ALiBi"],
        [[r["n"], r["family"], r["none_ms"], r["alibi_ms"], r["t5_relative_ms"], round(r["alibi_ratio"], 3),
          round(r["t5_ratio"], 3), round(r["t5_vs_alibi"], 3)] for r in rows],
    )
    text = "\n".join([
        "# T5 relative bias vs ALiBi vs no bias: one attention layer, forward + backward",
        "",
        (f"{torch.get_num_threads()} torch thread(s), fp32, batch 1, hidden {args.hidden}, {args.heads} heads; medians "
         f"of {args.repeats} interleaved repeats after {args.warmup} warm-up, "
         f"{'CPU seconds of the process' if args.cpu_time else 'wall clock'}. Measured {env['date']} on "
         f"{env.get('cpu')} ({env['cpu_count']} cores, load {env.get('load_average_1min')}), torch {env['torch']}. "
         f"Command: `python benchmarks/bench_t5_bias.py {' '.join(sys.argv[1:])}`."),
        "",
        ("full: a decoder (causal); its unbiased path is transformers' SDPA, ALiBi the key-bias flash path, T5 the "
         "blocked SDPA path (blocks of 1024 queries with their bias tile). sliding_window: an encoder, window 512; "
         "all three run the native banded kernel, which takes the bias once per offset of its band (block + window "
         "values per head) and returns the T5 table's gradient summed per offset."),
        "",
        table,
    ])
    print(text)
    if args.output != "scratch":
        write_results(args.output, text, {"rows": rows, "args": vars(args)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                        help="full attention at 16k takes minutes per T5 step: --families sliding_window skips it")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps by this process's CPU seconds (use with --threads 1 on a loaded machine)")
    parser.add_argument("--output", default="bench_t5_bias", help="results name; 'scratch' prints only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report(run(args), args)


if __name__ == "__main__":
    main()
