"""Sparse, low-rank and hashed attention (issue 20): one attention layer, forward + backward, against the peers
measured in the same run.

Candidates (batch 1, hidden 512, 8 heads x 64, fp32, CPU), each a layer of its family with random weights:
- ``dense``: our full family on torch's SDPA (the baseline of the ratios);
- ``linformer``: ours, k = 256, per-layer (headwise) projections, max_position_embeddings = N;
- ``lsh``: ours, 2 hash rounds, chunks of 64, N/32 buckets (the paper's 2N/chunk), transformers' rule
  (``lsh_attend_across_buckets=True``), so it computes the same function as
- ``reformer_lsh``: transformers' ``LSHSelfAttention`` with the same settings (its peer; the tests hold the two equal);
- ``bigbird``: ours, blocks of 64, 3 random blocks per query block (transformers' defaults), the block-sparse path;
- ``bigbird_hf``: transformers' ``BigBirdBlockSparseAttention`` with the same settings (its peer; q/k/v only, no output
  projection, and it always builds the N x N matrix of attention probabilities it returns).

Time: median of interleaved forward+backward calls. Memory: the peak RSS growth of one forward+backward, each in a
fresh process after the setup (``common.run_in_fresh_process``). Other families add a builder to ``BUILDERS``.

    python benchmarks/bench_sparse.py                       # 1k, 4k and 16k tokens
    python benchmarks/bench_sparse.py --lengths 1024 --repeats 2 --output scratch_sparse

Results: ``benchmarks/results/<output>.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # `common` beside this file, whether run as a script or in a child process

from common import (  # noqa: E402
    interleaved_timings,
    markdown_table,
    median_ms,
    peak_rss_mib,
    release_freed_memory,
    reset_peak_rss,
    run_in_fresh_process,
    write_results,
)

HIDDEN, HEADS = 512, 8
CHUNK, HASHES, LINFORMER_K = 64, 2, 256
BIGBIRD_BLOCK, BIGBIRD_RANDOM = 64, 3


def xarch_layer(length: int, **options):
    """One attention layer of an XArch encoder of the given family options (sdpa path)."""
    from hf_xarch import XArchConfig
    from hf_xarch.model.registry import ATTENTION_MODULES

    config = XArchConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=1, attention_bias=False,
                         max_position_embeddings=length, **options)
    config._attn_implementation = "sdpa"
    return ATTENTION_MODULES[config.attention_type](config, 0)


def lsh_options(length: int) -> dict:
    return dict(num_hashes=HASHES, num_buckets=max(2, 2 * length // CHUNK), lsh_chunk_length=CHUNK, hash_seed=0)


def reformer_lsh(length: int):
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    options = lsh_options(length)
    config = ReformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_head_size=HIDDEN // HEADS,
                            attn_layers=["lsh"], lsh_attn_chunk_length=CHUNK, num_hashes=HASHES,
                            num_buckets=options["num_buckets"], hash_seed=0, is_decoder=False,
                            lsh_num_chunks_before=1, lsh_num_chunks_after=0, lsh_attention_probs_dropout_prob=0.0,
                            max_position_embeddings=length)
    # with its output projection (ReformerSelfOutput's bias-free dense), as our layers have o_proj
    layer, output = LSHSelfAttention(config), torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
    return lambda hidden: output(layer(hidden).hidden_states), torch.nn.ModuleList([layer, output])


def bigbird_hf(length: int):
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    config = BigBirdConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_type="block_sparse",
                           block_size=BIGBIRD_BLOCK, num_random_blocks=BIGBIRD_RANDOM, use_bias=False,
                           max_position_embeddings=length)
    layer = BigBirdBlockSparseAttention(config, seed=0)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(1, length),
                                                                                       BIGBIRD_BLOCK)
    return lambda hidden: layer(hidden, band, from_mask, to_mask, blocked, blocked)[0], layer


def ours(length: int, **options):
    layer = xarch_layer(length, **options)
    return lambda hidden: layer(hidden)[0], layer


# name -> length -> (forward function of a (1, N, HIDDEN) tensor, the module holding its parameters)
BUILDERS = {
    "dense": lambda n: ours(n, attention_type="full"),
    "linformer": lambda n: ours(n, attention_type="linformer", linformer_k=min(LINFORMER_K, n)),
    "lsh": lambda n: ours(n, attention_type="lsh", lsh_attend_across_buckets=True, **lsh_options(n)),
    "reformer_lsh": reformer_lsh,
    "bigbird": lambda n: ours(n, attention_type="bigbird", block_size=BIGBIRD_BLOCK, num_random_blocks=BIGBIRD_RANDOM),
    "bigbird_hf": bigbird_hf,
}


def step_function(name: str, length: int):
    """A zero-argument forward + backward of the candidate at this length."""
    torch.manual_seed(0)
    forward, module = BUILDERS[name](length)
    hidden = torch.randn(1, length, HIDDEN, requires_grad=True)
    weights = torch.randn(1, length, HIDDEN)

    def step():
        module.zero_grad(set_to_none=True)
        hidden.grad = None
        (forward(hidden) * weights).sum().backward()

    return step


def peak_memory(name: str, length: int, threads: int) -> dict:
    """In a fresh process: the RSS growth (MiB) of one forward + backward after a warm-up step."""
    torch.set_num_threads(threads)
    step = step_function(name, length)
    step()
    release_freed_memory()
    baseline = reset_peak_rss() and peak_rss_mib()
    step()
    return {"peak_mib": peak_rss_mib() - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--candidates", nargs="+", default=list(BUILDERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="sparse")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, data = [], {"lengths": args.lengths, "hidden": HIDDEN, "heads": HEADS, "chunk": CHUNK, "hashes": HASHES,
                      "linformer_k": LINFORMER_K, "results": {}}
    for length in args.lengths:
        times = interleaved_timings({name: step_function(name, length) for name in args.candidates},
                                    repeats=args.repeats)
        memory = {name: run_in_fresh_process(HERE, "peak_memory", {"name": name, "length": length,
                                                                   "threads": args.threads})["peak_mib"]
                  for name in args.candidates}
        base_ms, base_mib = median_ms(times["dense"]), memory["dense"]
        for name in args.candidates:
            ms = median_ms(times[name])
            data["results"][f"{name}@{length}"] = {"ms": ms, "peak_mib": memory[name]}
            rows.append([length, name, ms, ms / base_ms, memory[name], memory[name] / max(base_mib, 1e-9)])
        print(markdown_table(["N", "candidate", "fwd+bwd ms", "time / dense", "peak MiB", "memory / dense"],
                             rows[-len(args.candidates):]), flush=True)
    table = markdown_table(["N", "candidate", "fwd+bwd ms", "time / dense", "peak MiB", "memory / dense"], rows)
    command = "python benchmarks/bench_sparse.py " + " ".join(sys.argv[1:])
    write_results(args.output, f"# One attention layer, forward + backward\n\n`{command}`\n\n{table}\n", data)


if __name__ == "__main__":
    main()
