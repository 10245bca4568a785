"""Performer (FAVOR+): approximation error and decoding, measured in the same run against performer-pytorch and
full attention. Time and memory of one attention layer are cases of ``bench_attention.py`` (``cases_performer.py``).

1. relative error against exact softmax attention, ||out - exact|| / ||exact||, N = 1024, 8 heads x 64, for m in
   {16, 64, 256, 1024}: ours and lucidrains' performer-pytorch ``FastAttention`` on the same inputs AND the same random
   features (its buffer is overwritten with ours, so only the estimators' arithmetic differs; ours with the default
   feature floor and without it), at q, k ~ N(0, 1)/d^¼
   (the peers' published table) and at logit std 1 (q, k ~ N(0, 1)), beside the mean(v) baseline (uniform attention);
   mean over 3 feature draws. Also ours at m = 256 over a sweep of logit scales.
2. decoding: an XArchForCausalLM (hidden 512, 8 heads, 2 layers, vocab 1000, rope) prefilled with a 16k-token context,
   then greedy steps one token at a time from the cache: tokens/s (CPU time), cache MiB and the RSS growth during
   decoding, Performer (recurrent state) against full attention with transformers' KV cache; each side in a fresh
   process, 1 torch thread, the two sides alternating over the repeats.

    python benchmarks/bench_performer.py                                 # the full run
    python benchmarks/bench_performer.py --quick --output scratch_performer   # a small look

Results: ``benchmarks/results/<output>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # `common` beside this file, whether run as a script or in a child process

from common import (
    RESULTS_DIR,
    current_rss_mib,
    environment,
    markdown_table,
    peak_rss_mib,
    release_freed_memory,
    reset_peak_rss,
    run_in_fresh_process,
    write_results,
)

HEADS, HEAD_DIM = 8, 64
LOGIT_SCALES = (0.125, 0.25, 0.5, 1.0, 2.0)  # the std of q·k/√d


def make_inputs(length: int, scale: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (1, HEADS, length, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    return q * scale, k * scale, v


# ---- approximation error -----------------------------------------------------------------------------------------
def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out - exact).norm() / exact.norm())


def errors_at(q, k, v, count: int, draws: int) -> tuple[float, float, float]:
    """Mean relative error over ``draws`` projections of ours (the default feature floor, and none: the unbiased
    estimate) and of performer-pytorch, all three with the same features."""
    from performer_pytorch import FastAttention

    from hf_xarch.model.attention_performer import DEFAULT_FEATURE_FLOOR, draw_projection, performer_attention

    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ours, unbiased, peer = [], [], []
    for draw in range(draws):
        projection = draw_projection(count, HEAD_DIM, seed=100 + draw)
        ours.append(relative_error(performer_attention(q, k, v, projection, feature_floor=DEFAULT_FEATURE_FLOOR)[0],
                                   exact))
        unbiased.append(relative_error(performer_attention(q, k, v, projection)[0], exact))
        layer = FastAttention(HEAD_DIM, nb_features=count)
        layer.projection_matrix.copy_(projection)  # the same features: only the estimator differs
        peer.append(relative_error(layer(q, k, v), exact))
    return sum(ours) / draws, sum(unbiased) / draws, sum(peer) / draws


@torch.no_grad()
def measure_errors(length: int, feature_counts: list[int], draws: int, sweep_features: int) -> dict:
    rows = []
    for label, scale in (("q,k ~ N(0,1)/d^1/4", HEAD_DIM**-0.25), ("logit std 1: q,k ~ N(0,1)", 1.0)):
        q, k, v = make_inputs(length, scale, seed=1)
        baseline = relative_error(v.mean(2, keepdim=True).expand_as(v), F.scaled_dot_product_attention(q, k, v))
        for count in feature_counts:
            ours, unbiased, peer = errors_at(q, k, v, count, draws)
            rows.append({"inputs": label, "features": count, "xarch": ours, "xarch_unbiased": unbiased,
                         "performer_pytorch": peer, "mean_v": baseline})
            print(f"error {label:28s} m={count:5d}: xarch {ours:.3f} (unbiased {unbiased:.3f})  "
                  f"performer-pytorch {peer:.3f}  mean(v) {baseline:.3f}", flush=True)
    sweep = []
    for logit_std in LOGIT_SCALES:
        q, k, v = make_inputs(length, logit_std**0.5, seed=2)  # q·k/√d has std s² when q, k ~ N(0, s²)
        baseline = relative_error(v.mean(2, keepdim=True).expand_as(v), F.scaled_dot_product_attention(q, k, v))
        ours, unbiased, peer = errors_at(q, k, v, sweep_features, draws)
        sweep.append({"logit_std": logit_std, "xarch": ours, "xarch_unbiased": unbiased, "performer_pytorch": peer,
                      "mean_v": baseline})
        print(f"error logit std {logit_std:5.3f} m={sweep_features}: xarch {ours:.3f} (unbiased {unbiased:.3f})  "
              f"performer-pytorch {peer:.3f}  mean(v) {baseline:.3f}", flush=True)
    return {"by_features": rows, "by_logit_std": sweep, "sweep_features": sweep_features}


# ---- decoding -------------------------------------------------------------------------------------------------------
def measure_decoding(attention: str, context: int, new_tokens: int, features: int) -> dict:
    """In a fresh process: prefill ``context`` tokens, then ``new_tokens`` greedy steps from the cache."""
    torch.set_num_threads(1)
    from transformers import DynamicCache

    from hf_xarch import XArchConfig, XArchForCausalLM

    torch.manual_seed(0)
    config = XArchConfig(vocab_size=1000, hidden_size=512, num_hidden_layers=2, num_attention_heads=HEADS,
                         max_position_embeddings=context + new_tokens, position_embedding_type="rope",
                         attention_type=attention, performer_nb_features=features, is_decoder=True)
    model = XArchForCausalLM(config).eval()
    ids = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        start = time.process_time()
        token = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        prefill_s = time.process_time() - start
        del ids
        release_freed_memory()
        before = current_rss_mib()
        reset_peak_rss()
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        decode_cpu, decode_wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    cache_bytes = 0
    for layer in cache.layers:  # a KV layer's keys and values, or every tensor of a Performer layer's state
        tensors = getattr(layer, "tensors", None) or (getattr(layer, "keys", None), getattr(layer, "values", None))
        cache_bytes += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return {"tokens_per_s": new_tokens / decode_cpu, "tokens_per_s_wall": new_tokens / decode_wall,
            "prefill_s": prefill_s, "cache_mib": cache_bytes / 2**20, "decode_peak_mib": peak_rss_mib() - before,
            "rss_before_decode_mib": before}


# ---- the run -------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    errors = {} if args.skip_error else measure_errors(args.error_length, args.error_features, args.error_draws,
                                                        args.features)
    decoding: dict[str, list[dict]] = {"performer": [], "full": []}
    if not args.skip_decode:
        for repeat in range(args.decode_repeats):
            for attention in ("performer", "full") if repeat % 2 == 0 else ("full", "performer"):
                result = run_in_fresh_process(HERE, "measure_decoding", {
                    "attention": attention, "context": args.decode_context, "new_tokens": args.decode_tokens,
                    "features": args.features}, threads=1)
                decoding[attention].append(result)
                print(f"decode {attention:9s} at {args.decode_context} context: {result}", flush=True)
    return {"settings": vars(args), "errors": errors, "decoding": decoding}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def report(results: dict, output: str) -> None:
    args, errors, decoding = results["settings"], results["errors"], results["decoding"]
    lines = ["# Performer (FAVOR+): approximation error and decoding", ""]
    if errors:
        lines += [
            (f"Relative error ||out - exact|| / ||exact|| against exact softmax attention, N = {args['error_length']}, "
            f"{HEADS} heads x {HEAD_DIM}, the same inputs and the same random features for every Performer (mean "
            f"over {args['error_draws']} draws). xarch: the default feature floor (1e-3); xarch unbiased: floor 0 "
            "(plain FAVOR+); mean(v) = uniform attention, the baseline:"), "",
            markdown_table(["inputs", "m", "xarch", "xarch unbiased", "performer-pytorch", "mean(v)"],
                           [[e["inputs"], e["features"], round(e["xarch"], 3), round(e.get("xarch_unbiased", 0), 3),
                             round(e["performer_pytorch"], 3), round(e["mean_v"], 3)]
                            for e in errors["by_features"]]), "",
            f"By logit scale (q, k ~ N(0, s²): logit std s²), m = {args['features']}:", "",
            markdown_table(["logit std", "xarch", "xarch unbiased", "performer-pytorch", "mean(v)"],
                           [[e["logit_std"], round(e["xarch"], 3), round(e.get("xarch_unbiased", 0), 3),
                             round(e["performer_pytorch"], 3), round(e["mean_v"], 3)]
                            for e in errors["by_logit_std"]]), "",
        ]
    if decoding["performer"] and decoding["full"]:
        table = []
        for name, runs in decoding.items():
            table.append([name, round(median_of(runs, "tokens_per_s"), 1), round(median_of(runs, "tokens_per_s_wall"), 1),
                          round(median_of(runs, "cache_mib"), 2), round(median_of(runs, "decode_peak_mib"), 1),
                          round(median_of(runs, "prefill_s"), 1)])
        speed = median_of(decoding["performer"], "tokens_per_s") / median_of(decoding["full"], "tokens_per_s")
        cache = median_of(decoding["performer"], "cache_mib") / median_of(decoding["full"], "cache_mib")
        lines += [
            (f"Decoding after a {args['decode_context']}-token context (XArchForCausalLM: hidden 512, 2 layers, "
            f"{HEADS} heads, rope, vocab 1000; m = {args['features']}), {args['decode_tokens']} greedy steps from the "
            f"cache, 1 thread, median of {len(decoding['full'])} fresh processes per side; tokens/s from CPU time "
            "(wall time beside it); decode MiB = RSS growth while decoding:"), "",
            markdown_table(["attention", "tokens/s", "tokens/s (wall)", "cache MiB", "decode MiB", "prefill s (CPU)"],
                           table), "",
            f"performer / full attention: {speed:.2f}x the tokens/s, {cache:.4f}x the cache memory.", "",
        ]
    env = environment()
    lines.append(f"Measured {env['date']} on {env['cpu']} ({env['cpu_count']} cores, load "
                 f"{env.get('load_average_1min')}), torch {env['torch']}. Command: `python "
                 f"benchmarks/bench_performer.py {' '.join(sys.argv[1:])}`".rstrip())
    write_results(output, "\n".join(lines), results)
    if errors:
        plot(errors, RESULTS_DIR / f"{output}.png")


def plot(errors: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(e["inputs"] for e in errors["by_features"]))
    fig, axes = plt.subplots(1, len(labels) + 1, figsize=(5.2 * (len(labels) + 1), 4.2), squeeze=False)
    for axis, label in zip(axes[0], labels):
        rows = [e for e in errors["by_features"] if e["inputs"] == label]
        counts = [e["features"] for e in rows]
        axis.plot(counts, [e["xarch"] for e in rows], marker="o", label="xarch performer")
        axis.plot(counts, [e["xarch_unbiased"] for e in rows], marker=".", linestyle=":", label="xarch, no floor")
        axis.plot(counts, [e["performer_pytorch"] for e in rows], marker="o", label="performer-pytorch")
        axis.axhline(rows[0]["mean_v"], color="black", linestyle="--", linewidth=1, label="mean(v)")
        axis.set(xscale="log", yscale="log", title=label, xlabel="random features m", ylabel="relative error")
        axis.legend(fontsize=8)
    axis, sweep = axes[0][-1], errors["by_logit_std"]
    scales = [e["logit_std"] for e in sweep]
    for key, name in (("xarch", "xarch performer"), ("xarch_unbiased", "xarch, no floor"),
                      ("performer_pytorch", "performer-pytorch"), ("mean_v", "mean(v)")):
        axis.plot(scales, [e[key] for e in sweep], marker="o", label=name, linestyle="--" if key == "mean_v" else "-")
    axis.set(xscale="log", yscale="log", title=f"by logit std (m = {errors.get('sweep_features', 256)})",
             xlabel="logit std", ylabel="relative error")
    axis.set_xticks(scales, [f"{scale:g}" for scale in scales])
    axis.minorticks_off()
    axis.legend(fontsize=8)
    fig.suptitle("Performer: relative error against exact softmax attention (N=1024, 8 heads x 64)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=256, help="m for decoding and the logit sweep")
    parser.add_argument("--error-length", type=int, default=1024)
    parser.add_argument("--error-features", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--error-draws", type=int, default=3)
    parser.add_argument("--decode-context", type=int, default=16384)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument("--skip-error", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--quick", action="store_true", help="m in {16, 256}, 1 draw, a 1k decode context")
    parser.add_argument("--output", default="bench_performer")
    args = parser.parse_args()
    if args.quick:
        args.error_features, args.error_draws = [16, 256], 1
        args.decode_context, args.decode_tokens, args.decode_repeats = 1024, 8, 1
    report(run(args), args.output)


if __name__ == "__main__":
    main()
