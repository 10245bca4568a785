"""Converted models against their originals: one training step (forward + backward) and its peak memory.

transformers' ``BertModel`` and ``GPT2LMHeadModel`` (hidden 512, 4 layers, 8 heads by default) are converted with
``hf_xarch.convert.from_hf`` and both run the same training step on the same tokens:

- BertModel: mean of the squared last hidden state (a loss that touches every output; the pooler is not part of
  it, and XArchModel has none);
- GPT2LMHeadModel: the causal LM loss with ``labels=input_ids`` (the full 50257-token output layer).

Time: the original and the converted step alternate within one process (``common.interleaved_timings``), median of
the repeats. Memory: each model trains in a fresh process whose RSS high-water mark is reset once the model is built,
so the peak is weights + gradients + activations of the step. Both processes do the same setup (build the original,
convert it, drop the side they do not measure) and run with a fixed glibc mmap threshold (``STEADY_MALLOC_ENV``),
which makes the peak of identical runs repeat to within a MiB.

    python benchmarks/bench_models.py                   # the default sizes, sequences 512 and 1024
    python benchmarks/bench_models.py --seq 128 --repeats 2 --models bert   # a quick look
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # `common` beside this file, whether run as a script or in a child process

from common import (  # noqa: E402
    RESULTS_DIR,
    STEADY_MALLOC_ENV,
    bar_plot,
    current_rss_mib,
    environment,
    interleaved_timings,
    markdown_table,
    median_ms,
    peak_rss_mib,
    release_freed_memory,
    reset_peak_rss,
    run_in_fresh_process,
    write_results,
)

MODELS = ("bert", "gpt2")


def build_original(model: str, hidden: int, layers: int, heads: int, max_seq: int, attn: str, dropout: float,
                   vocab: int | None):
    """The transformers model, seeded so that every process builds the same weights."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if model == "bert":
        config = BertConfig(
            vocab_size=vocab or 30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=max(512, max_seq),
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        )
        return BertModel._from_config(config, attn_implementation=attn)
    config = GPT2Config(
        vocab_size=vocab or 50257, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max(1024, max_seq),
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation=attn)


def make_inputs(model: str, vocab_size: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    if model == "bert":
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    return dict(input_ids=ids, labels=ids)


def training_step(model: str, network: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    network.zero_grad(set_to_none=True)
    outputs = network(**inputs)
    loss = outputs.last_hidden_state.square().mean() if model == "bert" else outputs.loss
    loss.backward()


def measure_memory(
    model: str, side: str, seq: int, batch: int, threads: int, steps: int, max_seq: int, **build
) -> dict:
    """Runs in a fresh process (see ``run_in_fresh_process``): peak RSS over ``steps`` training steps of one side."""
    torch.set_num_threads(threads)
    from hf_xarch.convert import from_hf  # both sides import it, so both processes hold the same libraries

    # both sides build the original and convert it, then keep one: the same history, so the same allocator state
    original = build_original(model, max_seq=max_seq, **build)
    converted = from_hf(original)
    network = converted if side == "xarch" else original
    del original, converted
    network.train()
    inputs = make_inputs(model, network.config.vocab_size, batch, seq)
    release_freed_memory()
    before = current_rss_mib()
    exact = reset_peak_rss()
    for _ in range(steps):
        training_step(model, network, inputs)
    peak = peak_rss_mib()
    return {"rss_before_mib": before, "peak_mib": peak, "step_mib": peak - before, "exact_reset": exact}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from hf_xarch.convert import from_hf

    build = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, attn=args.attn, dropout=args.dropout,
                 vocab=args.vocab)
    rows = []
    for model in args.models:
        original = build_original(model, max_seq=max(args.seq), **build).train()
        converted = from_hf(original).train()
        for seq in args.seq:
            inputs = make_inputs(model, original.config.vocab_size, args.batch, seq)
            steps = {
                side: functools.partial(training_step, model, network, inputs)
                for side, network in (("transformers", original), ("xarch", converted))
            }
            times = interleaved_timings(steps, repeats=args.repeats, warmup=args.warmup)
            memory = {
                side: run_in_fresh_process(
                    HERE, "measure_memory",
                    dict(model=model, side=side, seq=seq, batch=args.batch, threads=args.threads,
                         steps=args.memory_steps, max_seq=max(args.seq), **build),
                    threads=args.threads,
                    env=STEADY_MALLOC_ENV,
                )
                for side in ("transformers", "xarch")
            }
            row = {
                "model": model,
                "seq": seq,
                "transformers_ms": median_ms(times["transformers"]),
                "xarch_ms": median_ms(times["xarch"]),
                "transformers_times_s": times["transformers"],
                "xarch_times_s": times["xarch"],
                "transformers_peak_mib": memory["transformers"]["peak_mib"],
                "xarch_peak_mib": memory["xarch"]["peak_mib"],
                "transformers_step_mib": memory["transformers"]["step_mib"],
                "xarch_step_mib": memory["xarch"]["step_mib"],
                "memory": memory,
            }
            row["time_ratio"] = row["xarch_ms"] / row["transformers_ms"]
            row["peak_ratio"] = row["xarch_peak_mib"] / row["transformers_peak_mib"]
            row["step_memory_ratio"] = row["xarch_step_mib"] / max(row["transformers_step_mib"], 1e-9)
            rows.append(row)
            print(
                f"{model:5s} seq {seq:5d}: time {row['transformers_ms']:8.1f} / {row['xarch_ms']:8.1f} ms "
                f"(x{row['time_ratio']:.3f}), peak {row['transformers_peak_mib']:7.1f} / {row['xarch_peak_mib']:7.1f} "
                f"MiB (x{row['peak_ratio']:.3f}), step {row['transformers_step_mib']:7.1f} / "
                f"{row['xarch_step_mib']:7.1f} MiB (x{row['step_memory_ratio']:.3f})",
                flush=True,
            )
        del original, converted
    command = " ".join(["python benchmarks/bench_models.py", *sys.argv[1:]])
    return {"settings": vars(args), "command": command, "rows": rows}


def report(results: dict, output: str) -> None:
    args = results["settings"]
    names = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel"}
    def spread(seconds: list[float]) -> str:
        return f"{1000 * min(seconds):.0f}-{1000 * max(seconds):.0f}"

    headers = ["model", "seq", "transformers ms", "XArch ms", "time ratio", "transformers range ms", "XArch range ms",
               "transformers peak MiB", "XArch peak MiB", "peak ratio", "transformers step MiB", "XArch step MiB",
               "step ratio"]
    table = markdown_table(headers, [
        [names[r["model"]], r["seq"], r["transformers_ms"], r["xarch_ms"], round(r["time_ratio"], 3),
         spread(r["transformers_times_s"]), spread(r["xarch_times_s"]), r["transformers_peak_mib"],
         r["xarch_peak_mib"], round(r["peak_ratio"], 3), r["transformers_step_mib"], r["xarch_step_mib"],
         round(r["step_memory_ratio"], 3)]
        for r in results["rows"]
    ])
    env = results.get("environment") or environment()
    markdown = "\n".join([
        "# Converted models vs. their transformers originals: one training step",
        "",
        f"hidden {args['hidden']}, {args['layers']} layers, {args['heads']} heads, batch {args['batch']}, "
        f"attn_implementation={args['attn']}, dropout {args['dropout']}, {args['threads']} torch thread(s), fp32; "
        f"median of {args['repeats']} interleaved repeats (after {args['warmup']} warm-up). Ratios are XArch / "
        "transformers (< 1: XArch is faster / smaller); the range columns show how much a shared machine moves "
        "single steps.",
        "",
        "peak MiB: the RSS high-water mark of a fresh process over the training steps (weights, gradients, "
        "activations and the Python/torch runtime); step MiB: that peak minus the RSS just before the first step "
        "(gradients and activations).",
        "",
        table,
        "",
        f"Measured {env['date']} on {env['cpu']} ({env['cpu_count']} cores, load {env.get('load_average_1min')}), "
        f"torch {env['torch']}, transformers {env.get('transformers')}. Command: "
        f"`{results.get('command', 'python benchmarks/bench_models.py')}`",
    ])
    stem = output
    write_results(stem, markdown, results)
    groups = [f"{names[r['model']]} {r['seq']}" for r in results["rows"]]
    bar_plot(
        RESULTS_DIR / f"{stem}.png",
        groups,
        [
            ("training step (ms)", {"transformers": [r["transformers_ms"] for r in results["rows"]],
                                    "XArch": [r["xarch_ms"] for r in results["rows"]]}),
            ("peak RSS (MiB)", {"transformers": [r["transformers_peak_mib"] for r in results["rows"]],
                                "XArch": [r["xarch_peak_mib"] for r in results["rows"]]}),
            ("ratio XArch / transformers", {"time": [r["time_ratio"] for r in results["rows"]],
                                            "peak memory": [r["peak_ratio"] for r in results["rows"]],
                                            "step memory": [r["step_memory_ratio"] for r in results["rows"]]}),
        ],
        "from_hf(BertModel / GPT2LMHeadModel) vs. the original, one training step",
        reference_line=1.0,
    )
    print(table)
    print(f"saved {RESULTS_DIR / stem}.md, .json, .png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seq", nargs="+", type=int, default=[512, 1024], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (default: BERT's 30522, GPT-2's 50257)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attn_implementation of both")
    parser.add_argument("--dropout", type=float, default=0.1, help="every dropout of both models (training mode)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps in each memory process")
    parser.add_argument("--output", default="bench_models", help="results file stem under benchmarks/results/")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render the table and plot from results/<output>.json without measuring")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.report_only:
        report(json.loads((RESULTS_DIR / f"{arguments.output}.json").read_text()), arguments.output)
    else:
        report(run(arguments), arguments.output)
