"""Quantized KV cache (``generate(cache_implementation="quantized")``, KIVI) against the float cache, in one run.

A tiny full-attention decoder is trained by the pretrain recipe's library on the default corpus and measured as it is
and as a sliding-window model with attention sinks (the same weights with ``attention_type="sliding_window"``, window
128, 4 sinks: StreamingLLM's use of a model trained with full attention). For each, the float cache and each quantized
setting (8/4/2 bits x residual 0/32/128):

- **bits per byte** on held-out text, scored through cached decoding: teacher-forced, token by token, over rows of
  ``--eval-tokens`` contiguous held-out tokens (longer than the training block), every token through the cache;
- **cache MiB** after ``--long`` tokens (prefilled in chunks of 1024), and the ratio to the float cache (residual 32);
- **decode tokens/s** at that context (batch 1), float and quantized steps interleaved (``interleaved_timings``).

    python benchmarks/bench_kv_cache.py                                  # the recorded run
    python benchmarks/bench_kv_cache.py --steps 50 --long 2048 --eval-tokens 256 --output scratch   # quick look
    python benchmarks/bench_kv_cache.py --trained runs/bench_kv_cache/full --decode-only --output scratch  # speed only

Results: ``benchmarks/results/<output>.{md,json}``. The models are tiny (hidden 128, 4 layers, head_dim 32, fp32), so
the scales are fp32 and a group is the whole head_dim (32): the byte ratios are those of this setting, not of an
fp16 model with groups of 64 (``hf_xarch.summary`` reports any config's).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_timings, markdown_table, median_ms, write_results  # noqa: E402

from hf_xarch import XArchForCausalLM  # noqa: E402
from hf_xarch.model.cache_quantized import XArchQuantizedCache  # noqa: E402
from hf_xarch.train.config import load_config, merge, xarch_config_fields  # noqa: E402
from hf_xarch.train.data import load_records  # noqa: E402
from hf_xarch.train.pretrain import DEFAULTS as PRETRAIN_DEFAULTS  # noqa: E402
from hf_xarch.train.pretrain import run_pretrain  # noqa: E402
from transformers import AutoTokenizer, DynamicCache  # noqa: E402

MODELS = {
    "full": {},
    "sliding+sinks": {"attention_type": "sliding_window", "attention_window": 128, "attention_sink_size": 4},
}
BITS = (8, 4, 2)
RESIDUALS = (0, 32, 128)


def pretrain_config(args):
    values = {
        "output_dir": str(Path(args.work) / "full"),
        "model": {**PRETRAIN_DEFAULTS["model"], "max_position_embeddings": args.long + 2048},
        "data": {**PRETRAIN_DEFAULTS["data"], "max_bytes": args.corpus_bytes, "block_size": args.block_size},
        "tokenizer": {**PRETRAIN_DEFAULTS["tokenizer"], "vocab_size": 2048, "train_bytes": args.corpus_bytes // 2},
        "training": {**PRETRAIN_DEFAULTS["training"], "max_steps": args.steps, "micro_batch_size": args.batch},
        "evaluation": {**PRETRAIN_DEFAULTS["evaluation"], "every_steps": 0, "max_batches": 1, "final_max_batches": 1},
        "checkpoint": {**PRETRAIN_DEFAULTS["checkpoint"], "every_steps": 0, "resume": "never"},
        "logging": {**PRETRAIN_DEFAULTS["logging"], "tensorboard": False, "plot": False, "progress_bar": False},
    }
    return load_config(merge(PRETRAIN_DEFAULTS, values, {"model": xarch_config_fields()}))


def heldout_rows(cfg, tokenizer, rows: int, length: int, repeat: bool = False) -> torch.Tensor:
    """``rows`` stretches of ``length`` contiguous held-out tokens (the held-out documents joined)."""
    records = load_records(cfg.data, cfg.seed)
    text = "\n\n".join(record[cfg.data.text_column] for record in records.heldout)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if repeat:  # the long context (memory, speed): the held-out text again where it is shorter
        ids = ids.repeat(-(-rows * length // ids.numel()))
    if ids.numel() < rows * length:
        raise SystemExit(f"held-out text has {ids.numel()} tokens, fewer than {rows} x {length}")
    return ids[: rows * length].view(rows, length)


def make_cache(model, setting):
    return DynamicCache(config=model.config) if setting is None else XArchQuantizedCache(model.config, **setting)


@torch.no_grad()
def bits_per_byte(model, tokenizer, rows: torch.Tensor, setting) -> float:
    """Teacher-forced cached decoding, one token at a time: -log2 p(next) summed, over the bytes of those tokens."""
    cache = make_cache(model, setting)
    nats = 0.0
    for t in range(rows.shape[1] - 1):
        logits = model(rows[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1].float()
        nats += float(torch.nn.functional.cross_entropy(logits, rows[:, t + 1], reduction="sum"))
    scored_bytes = sum(len(tokenizer.decode(row[1:]).encode("utf-8")) for row in rows)
    return nats / math.log(2) / scored_bytes


def cache_bytes(cache) -> int:
    if isinstance(cache, XArchQuantizedCache):
        return cache.nbytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.is_initialized)


@torch.no_grad()
def long_context(model, context: torch.Tensor, setting) -> tuple:
    """A cache filled with ``context`` (1, N) in chunks of 1024, and its bytes."""
    cache = make_cache(model, setting)
    for start in range(0, context.shape[1], 1024):
        model(context[:, start : start + 1024], cache=cache, use_cache=True)
    return cache, cache_bytes(cache)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of each model")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="training rows per step")
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--eval-rows", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=512)
    parser.add_argument("--long", type=int, default=16384, help="context of the memory and speed figures")
    parser.add_argument("--decode-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/bench_kv_cache")
    parser.add_argument("--trained", default=None, help="measure the model saved in this folder instead of training")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--output", default="kv_cache")
    parser.add_argument("--decode-only", action="store_true",
                        help="only the cache MiB and decode tokens/s at --long (no bits per byte: a quick speed check)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {"float": None}
    settings.update({f"{b}-bit r{r}": {"nbits": b, "residual_length": r} for b in BITS for r in RESIDUALS})
    data = {"args": vars(args), "models": {}, "load_average_at_start": os.getloadavg()}
    markdown = [f"# Quantized KV cache vs float (`bench_kv_cache.py`)\n\n`python benchmarks/bench_kv_cache.py "
                f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n"]
    cfg = pretrain_config(args)
    began = time.perf_counter()
    if args.trained:  # a model this script trained before (same --corpus-bytes): its folder
        folder, tokenizer = args.trained, AutoTokenizer.from_pretrained(args.trained)
    else:
        trained = run_pretrain(cfg)
        folder, tokenizer = trained.output_dir, trained.tokenizer
        data["training"] = {"seconds": time.perf_counter() - began, "eval": trained.eval_metrics}
    trained_s = time.perf_counter() - began
    rows = heldout_rows(cfg, tokenizer, args.eval_rows, args.eval_tokens)
    context = heldout_rows(cfg, tokenizer, 1, args.long, repeat=True)
    for name in args.models:
        fields = MODELS[name]
        model = XArchForCausalLM.from_pretrained(folder, **fields).eval()
        # memory and decode speed at the long context: float and residual 32 (128 would keep a whole 128-token
        # window in full precision: nothing to quantize on the sliding model)
        long_settings = ["float", *(f"{b}-bit r32" for b in BITS)]
        results = {label: {} for label in (long_settings if args.decode_only else settings)}
        for label, setting in settings.items():
            if args.decode_only:
                continue
            began = time.perf_counter()
            results[label] = {"bits_per_byte": bits_per_byte(model, tokenizer, rows, setting)}
            print(f"{name} {label}: {results[label]['bits_per_byte']:.4f} bits/byte "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
        caches = {}
        for label in long_settings:
            caches[label], results[label]["cache_bytes"] = long_context(model, context, settings[label])
        token = context[:, :1]
        steps = {label: (lambda c=caches[label], m=model, t=token: m(t, cache=c, use_cache=True))
                 for label in long_settings}
        with torch.no_grad():
            times = interleaved_timings(steps, repeats=args.decode_tokens, warmup=1)
        for label in long_settings:
            results[label]["decode_ms"] = median_ms(times[label])
        base = results["float"]
        rows_md = []
        for label, figures in results.items():
            bpb = figures.get("bits_per_byte")
            row = [label, *((bpb, bpb / base["bits_per_byte"] - 1) if bpb is not None else ("", ""))]
            if "cache_bytes" in figures:
                row += [figures["cache_bytes"] / 2**20, figures["cache_bytes"] / base["cache_bytes"],
                        1000 / figures["decode_ms"], base["decode_ms"] / figures["decode_ms"]]
            else:
                row += ["", "", "", ""]
            rows_md.append(row)
        data["models"][name] = {"fields": fields, "results": results, "load_average_after": os.getloadavg()}
        trained_as = f"trained in {args.trained}" if args.trained else (
            f"{args.steps} steps of {args.batch} x {args.block_size} tokens ({trained_s:.0f} s)")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        markdown.append(f"## {name} ({fields or 'as trained'}): {trained_as}\n\nload average after it: {load} "
                        f"({os.cpu_count()} CPUs)\n")
        markdown.append(markdown_table(
            ["cache", "bits/byte", "vs float", f"cache MiB @ {args.long}", "x float", "decode tok/s", "x float"],
            rows_md) + "\n")
        print(markdown[-1], flush=True)
        write_results(args.output, "\n".join(markdown), data)  # after each model: a cut-short run keeps what it did
    return 0


if __name__ == "__main__":
    sys.exit(main())
