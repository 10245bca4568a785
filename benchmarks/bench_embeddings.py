"""Output layers for a large vocabulary: full, tied, factorized + tied, adaptive softmax (one causal LM body).

A V = 100,000 causal LM (hidden 512, 4 layers, 8 heads, RoPE) with five vocabulary layers:

- ``full``: untied V x H input embedding and H x V output layer (the reference of every ratio);
- ``tied``: one V x H matrix for both (``tie_word_embeddings=True``);
- ``factorized+tied``: ALBERT's V x E table (E = 128) with E -> H and H -> E projections, the output tied to the table;
- ``adaptive``: an untied V x H input embedding and an adaptive softmax (Grave et al. 2017) with cutoffs
  2,000 / 10,000 / 50,000 and div_value 4;
- ``factorized+adaptive``: both savings together (the adaptive softmax works in the E = 128 space).

Tokens are drawn from a Zipf(1) distribution over the ids (id = frequency rank, as a frequency-sorted vocabulary
has them): adaptive softmax's speed depends on most tokens falling in its shortlist, as they do in natural text
(about 68% of Zipf(1) tokens fall in the first 2,000 ids of 100,000).

One training step = forward with ``labels``, backward, AdamW step. Time: the variants alternate within one process
(``common.interleaved_timings``), median of the repeats. Memory: each variant trains in a fresh process; its peak RSS
(weights, gradients, AdamW state, activations, runtime) and its step memory (peak minus the RSS just before the
first step). Vocabulary parameters: the input table, the E <-> H projections and the output layer.

    python benchmarks/bench_embeddings.py                          # the full run (about 5 minutes on 1 thread)
    python benchmarks/bench_embeddings.py --vocab 20000 --repeats 1 --output bench_embeddings_smoke   # a quick look
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # `common` beside this file, whether run as a script or in a child process

from common import (  # noqa: E402
    RESULTS_DIR,
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

VARIANTS = ("full", "tied", "factorized+tied", "adaptive", "factorized+adaptive")


def variant_config(variant: str, vocab: int, hidden: int, layers: int, heads: int, embedding: int, cutoffs: list[int]):
    from hf_xarch import XArchConfig

    options = {
        "full": dict(tie_word_embeddings=False),
        "tied": dict(tie_word_embeddings=True),
        "factorized+tied": dict(tie_word_embeddings=True, embedding_size=embedding),
        "adaptive": dict(tie_word_embeddings=False, output_layer="adaptive", adaptive_cutoffs=cutoffs),
        "factorized+adaptive": dict(
            tie_word_embeddings=False, embedding_size=embedding, output_layer="adaptive", adaptive_cutoffs=cutoffs
        ),
    }[variant]
    return XArchConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, is_decoder=True, position_embedding_type="rope", max_position_embeddings=4096,
        adaptive_div_value=4.0, **options,
    )


def build(variant: str, args: dict):
    from hf_xarch import XArchForCausalLM

    torch.manual_seed(0)
    config = variant_config(variant, args["vocab"], args["hidden"], args["layers"], args["heads"], args["embedding"],
                            args["cutoffs"])
    config._attn_implementation = "sdpa"
    model = XArchForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def zipf_tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Token ids with P(id = r) proportional to 1 / (r + 1): a frequency-sorted vocabulary under Zipf's law."""
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, batch * seq, replacement=True, generator=generator).view(batch, seq)


def training_step(model, optimizer, ids: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def vocabulary_parameters(model) -> int:
    """The input table, the E <-> H projections and the output layer (a tied matrix counts once)."""
    names = ("model.embeddings.word_embeddings", "model.embeddings.projection", "lm_head_projection", "lm_head")
    seen, total = set(), 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith(names) and param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel()
    return total


def measure_memory(variant: str, args: dict) -> dict:
    """In a fresh process: build, reset the RSS high-water mark, train ``steps`` steps; peak and step MiB."""
    torch.set_num_threads(args["threads"])
    model, optimizer = build(variant, args)
    ids = zipf_tokens(args["vocab"], args["batch"], args["seq"])
    release_freed_memory()
    before = current_rss_mib()
    reset_peak_rss()
    for _ in range(args["memory_steps"]):
        training_step(model, optimizer, ids)
    peak = peak_rss_mib()
    return {"peak_mib": peak, "step_mib": peak - before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--embedding", type=int, default=128, help="E of the factorized variants")
    parser.add_argument("--cutoffs", type=int, nargs="+", default=None, help="default: 2%%, 10%%, 50%% of the vocab")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=2, help="steps in each memory process (AdamW state)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="bench_embeddings")
    parsed = parser.parse_args(argv)
    cutoffs = parsed.cutoffs or [parsed.vocab // 50, parsed.vocab // 10, parsed.vocab // 2]
    args = dict(vars(parsed), cutoffs=cutoffs)
    torch.set_num_threads(parsed.threads)

    ids = zipf_tokens(parsed.vocab, parsed.batch, parsed.seq)
    shares = [float((ids < c).float().mean()) for c in cutoffs]
    built = {variant: build(variant, args) for variant in VARIANTS}
    params = {v: (model.num_parameters(), vocabulary_parameters(model)) for v, (model, _) in built.items()}
    steps = {v: (lambda m=model, o=opt: training_step(m, o, ids)) for v, (model, opt) in built.items()}
    times = {v: median_ms(t) for v, t in interleaved_timings(steps, repeats=parsed.repeats, warmup=1).items()}
    del built, steps
    release_freed_memory()
    memory = {
        v: run_in_fresh_process(HERE, "measure_memory", {"variant": v, "args": args}, threads=parsed.threads)
        for v in VARIANTS
    }

    ref = "full"
    rows, data = [], {"args": args, "token_share_below_cutoffs": shares, "variants": {}}
    for v in VARIANTS:
        total, vocab_params = params[v]
        row = dict(
            parameters=total, vocabulary_parameters=vocab_params, step_ms=times[v], **memory[v],
            vocab_param_cut=params[ref][1] / vocab_params, speedup=times[ref] / times[v],
            peak_ratio=memory[v]["peak_mib"] / memory[ref]["peak_mib"],
            step_mem_ratio=memory[v]["step_mib"] / memory[ref]["step_mib"],
        )
        data["variants"][v] = row
        rows.append([v, f"{total / 1e6:.2f} M", f"{vocab_params / 1e6:.2f} M", row["vocab_param_cut"], row["step_ms"],
                     row["speedup"], row["peak_mib"], row["peak_ratio"], row["step_mib"], row["step_mem_ratio"]])
    headers = ["variant", "params", "vocab params", "vocab params cut (x)", "step ms", "speedup (x)", "peak MiB",
               "peak ratio", "step MiB", "step MiB ratio"]
    env = environment()
    markdown = "\n\n".join([
        "# Vocabulary layers of a causal LM: full, tied, factorized, adaptive softmax",
        (
            f"V={parsed.vocab:,}, hidden {parsed.hidden}, {parsed.layers} layers, {parsed.heads} heads, RoPE, "
            f"batch {parsed.batch} x seq {parsed.seq}, E={parsed.embedding} for the factorized variants, adaptive "
            f"cutoffs {cutoffs} (div 4); Zipf(1) tokens ({', '.join(f'{s:.0%}' for s in shares)} below the "
            f"cutoffs); one step = forward + backward + AdamW; {parsed.threads} torch thread(s), fp32, median of "
            f"{parsed.repeats} interleaved repeats. Ratios against `full` (untied V x H in and H x V out): 'cut' and "
            "'speedup' > 1 are better, memory ratios < 1 are better."
        ),
        markdown_table(headers, rows),
        (
            f"Measured {env['date']} on {env.get('cpu')} ({env['cpu_count']} cores, load "
            f"{env.get('load_average_1min')}), torch {env['torch']}, transformers {env.get('transformers')}. "
            f"Command: `python benchmarks/bench_embeddings.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        ),
    ])
    print(markdown)
    paths = write_results(parsed.output, markdown, data)
    paths.append(bar_plot(
        RESULTS_DIR / f"{parsed.output}.png", list(VARIANTS),
        [
            ("ratio vs full (higher is better)", {
                "vocab params cut": [data["variants"][v]["vocab_param_cut"] for v in VARIANTS],
                "step speedup": [data["variants"][v]["speedup"] for v in VARIANTS],
            }),
            ("memory ratio vs full (lower is better)", {
                "peak RSS": [data["variants"][v]["peak_ratio"] for v in VARIANTS],
                "step memory": [data["variants"][v]["step_mem_ratio"] for v in VARIANTS],
            }),
        ],
        f"V={parsed.vocab:,}, hidden {parsed.hidden}: vocabulary layers of a causal LM",
        reference_line=1.0,
    ))
    print("saved", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
