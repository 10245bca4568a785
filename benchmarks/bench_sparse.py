"""Sparse, low-rank and hashed attention (issue 20), three parts, each against peers measured in the same run.

``--part layer``: one attention layer, forward + backward (batch 1, hidden 512, 8 heads x 64, fp32, CPU), each a layer
of its family with random weights:
- ``dense``: our full family on torch's SDPA (the baseline of the ratios);
- ``linformer``: ours, k = 256, per-layer (headwise) projections, max_position_embeddings = N;
- ``lsh``: ours, 2 hash rounds, chunks of 64, N/32 buckets (the paper's 2N/chunk), transformers' rule
  (``lsh_attend_across_buckets=True``), so it computes the same function as
- ``reformer_lsh``: transformers' ``LSHSelfAttention`` with the same settings (its peer; the tests hold the two equal);
- ``bigbird``: ours, blocks of 64, 3 random blocks per query block (transformers' defaults), the block-sparse path;
- ``bigbird_hf``: transformers' ``BigBirdBlockSparseAttention`` with the same settings (its peer; q/k/v only, no output
  projection, and it always builds the N x N matrix of attention probabilities it returns).

``--part model``: one training step (forward, backward, AdamW step) of a 4-layer encoder (batch 1, hidden 256,
4 heads x 64, FFN 1024, vocabulary 1000, no dropout; the loss a fixed random projection of the last hidden states):
- ``bigbird_hf``: transformers' ``BigBirdModel`` (block_sparse, blocks of 64, 3 random blocks; no pooler);
- ``bigbird``: that model converted by ``from_hf`` (same architecture and weights), on SDPA; ``dense``, ``sliding``
  (window 512), ``lsh`` and ``linformer`` are the same converted model with every layer swapped to that family
  (``with_attention``; LSH and Linformer settings as in the layer part);
- ``reformer_lsh``: transformers' ``ReformerModel`` with 4 LSH layers of the same settings (its own architecture:
  reversible residuals, which recompute activations in the backward instead of storing them).

``--part quality``: approximation against full attention on a trained model. A masked-LM encoder is pretrained by
the pretrain recipe on the default corpus (``bench_linearize.pretrain_teacher``); each family is swapped into a copy
(every weight kept; Linformer's projections start at their initialisation, LSH drops ``k_proj`` for its shared
query/key projection) and fine-tuned briefly (all weights, the same steps, rows and seeded batches for every model,
the full-attention model included as the control). Reported: held-out masked-LM bits per byte (masked-token loss per
byte, 15% masked, seeded masks) before and after the fine-tune, on a seeded random sample of held-out blocks.

Time: median of interleaved calls (``--repeats 0``: the one measured step of the memory child, after its warm-up
step, for runs where the long lengths would not fit otherwise). Memory: the peak RSS growth of one step, each in a
fresh process after the setup and a warm-up step (``common.run_in_fresh_process``). A peer that cannot run at a
length is skipped, with the reason in the table (``skip_reason``).

    python benchmarks/bench_sparse.py                                    # one layer at 1k, 4k and 16k tokens
    python benchmarks/bench_sparse.py --part model --lengths 1024 4096 --output sparse_model
    python benchmarks/bench_sparse.py --part quality --output sparse_quality

Results: ``benchmarks/results/<output>.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # `common` beside this file, whether run as a script or in a child process

from common import (
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
    return {"num_hashes": HASHES, "num_buckets": max(2, 2 * length // CHUNK), "lsh_chunk_length": CHUNK,
            "hash_seed": 0}


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
LAYERS = {
    "dense": lambda n: ours(n, attention_type="full"),
    "linformer": lambda n: ours(n, attention_type="linformer", linformer_k=min(LINFORMER_K, n)),
    "lsh": lambda n: ours(n, attention_type="lsh", lsh_attend_across_buckets=True, **lsh_options(n)),
    "reformer_lsh": reformer_lsh,
    "bigbird": lambda n: ours(n, attention_type="bigbird", block_size=BIGBIRD_BLOCK, num_random_blocks=BIGBIRD_RANDOM),
    "bigbird_hf": bigbird_hf,
}


def layer_step(name: str, length: int):
    """A zero-argument forward + backward of the layer candidate at this length."""
    torch.manual_seed(0)
    forward, module = LAYERS[name](length)
    hidden = torch.randn(1, length, HIDDEN, requires_grad=True)
    weights = torch.randn(1, length, HIDDEN)

    def step():
        module.zero_grad(set_to_none=True)
        hidden.grad = None
        (forward(hidden) * weights).sum().backward()

    return step


# ---- the 4-layer encoder training step --------------------------------------------------------------------------------
MODEL_HIDDEN, MODEL_HEADS, MODEL_FFN, MODEL_LAYERS, VOCAB, WINDOW = 256, 4, 1024, 4, 1000, 512


def with_attention(model, **options):
    """A new XArch model of the same class whose every layer is ``options["attention_type"]`` with ``options``,
    holding every weight of ``model`` that the new family has; returns (model, weights dropped, weights added)."""
    from hf_xarch import swap_attention

    return swap_attention(model, **options)


def bigbird_model(length: int):
    from transformers import BigBirdConfig, BigBirdModel

    config = BigBirdConfig(vocab_size=VOCAB, hidden_size=MODEL_HIDDEN, num_hidden_layers=MODEL_LAYERS,
                           num_attention_heads=MODEL_HEADS, intermediate_size=MODEL_FFN, attention_type="block_sparse",
                           block_size=BIGBIRD_BLOCK, num_random_blocks=BIGBIRD_RANDOM, max_position_embeddings=length,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BigBirdModel(config, add_pooling_layer=False)


def converted_model(length: int, **options):
    """``bigbird_model`` through ``from_hf``, with every layer swapped to ``options`` when given, on SDPA."""
    from hf_xarch.convert import from_hf

    model = from_hf(bigbird_model(length))
    if options:
        model = with_attention(model, **options)[0]
    model.set_attn_implementation("sdpa")  # from_hf keeps BigBird's eager, which is the dense reference
    return model


def reformer_model(length: int):
    from transformers import ReformerConfig, ReformerModel

    options = lsh_options(length)
    config = ReformerConfig(vocab_size=VOCAB, hidden_size=MODEL_HIDDEN, num_attention_heads=MODEL_HEADS,
                            attention_head_size=MODEL_HIDDEN // MODEL_HEADS, feed_forward_size=MODEL_FFN,
                            attn_layers=["lsh"] * MODEL_LAYERS, axial_pos_embds=False, max_position_embeddings=length,
                            lsh_attn_chunk_length=CHUNK, num_hashes=HASHES, num_buckets=options["num_buckets"],
                            is_decoder=False, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
                            hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0)
    return ReformerModel(config)


# name -> length -> a base model whose output has `last_hidden_state`
MODELS = {
    "dense": lambda n: converted_model(n, attention_type="full"),
    "sliding": lambda n: converted_model(n, attention_type="sliding_window", attention_window=WINDOW),
    "linformer": lambda n: converted_model(n, attention_type="linformer", linformer_k=min(LINFORMER_K, n)),
    "lsh": lambda n: converted_model(n, attention_type="lsh", lsh_attend_across_buckets=True, **lsh_options(n)),
    "reformer_lsh": reformer_model,
    "bigbird": converted_model,
    "bigbird_hf": bigbird_model,
}


def model_step(name: str, length: int):
    """A zero-argument training step of the model candidate at this length."""
    torch.manual_seed(0)
    model = MODELS[name](length).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids = torch.randint(4, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    # Reformer's last hidden state joins its two reversible streams (2 x hidden wide): the projection covers both
    weights = torch.randn(1, length, 2 * MODEL_HIDDEN)

    def step():
        optimizer.zero_grad(set_to_none=True)
        hidden = model(input_ids=input_ids).last_hidden_state
        (hidden * weights[..., : hidden.shape[-1]]).sum().backward()
        optimizer.step()

    return step


# ---- speed and memory (layer and model parts) ---------------------------------------------------------------------------
STEPS = {"layer": (layer_step, LAYERS, HEADS), "model": (model_step, MODELS, MODEL_HEADS)}  # step, candidates, heads
PEERS = {"bigbird": "bigbird_hf", "lsh": "reformer_lsh"}  # ours -> its transformers counterpart
MACHINE_GIB = 23  # this shared machine; transformers' BigBird past it (or near it) is not started


def skip_reason(part: str, name: str, length: int) -> str | None:
    """Why a candidate cannot run at this length here, or None."""
    heads = STEPS[part][2]
    if name == "bigbird_hf":
        # transformers 5.25's BigBirdBlockSparseAttention fills torch.zeros(batch, heads, N, N) with the probabilities
        # it returns, whatever output_attentions says, in every layer's forward (the backward of a scatter keeps none)
        gib = heads * length * length * 4 / 2**30
        if 2 * gib > MACHINE_GIB / 4:
            return (f"not run: transformers' block-sparse layer always builds its ({heads} x N x N) fp32 matrix of "
                    f"attention probabilities, {gib:.1f} GiB per layer (twice that while it is filled), on a "
                    f"{MACHINE_GIB} GiB machine shared with two other long jobs")
    return None


def measure(part: str, name: str, length: int, threads: int) -> dict:
    """In a fresh process: after a warm-up step, the RSS growth (MiB) and the time (ms) of one more step."""
    torch.set_num_threads(threads)
    step = STEPS[part][0](name, length)
    step()
    release_freed_memory()
    baseline = reset_peak_rss() and peak_rss_mib()
    start = time.perf_counter()
    step()
    return {"ms": 1000 * (time.perf_counter() - start), "peak_mib": peak_rss_mib() - baseline}


def speed_rows(args, base: str) -> tuple[list, dict, list]:
    step_of = STEPS[args.part][0]
    rows, results, goals = [], {}, []
    for length in args.lengths:
        skipped = {name: skip_reason(args.part, name, length) for name in args.candidates}
        running = [name for name in args.candidates if not skipped[name]]
        memory = {name: run_in_fresh_process(HERE, "measure", {"part": args.part, "name": name, "length": length,
                                                               "threads": args.threads}) for name in running}
        if args.repeats:
            times = interleaved_timings({name: step_of(name, length) for name in running}, repeats=args.repeats)
            ms = {name: median_ms(times[name]) for name in running}
        else:
            ms = {name: memory[name]["ms"] for name in running}
        for name in args.candidates:
            if skipped[name]:
                rows.append([length, name, "-", "-", "-", "-", skipped[name]])
                results[f"{name}@{length}"] = {"skipped": skipped[name]}
                continue
            mib = memory[name]["peak_mib"]
            results[f"{name}@{length}"] = {"ms": ms[name], "peak_mib": mib}
            rows.append([length, name, ms[name], ms[name] / ms[base], mib, mib / max(memory[base]["peak_mib"], 1e-9),
                         ""])
        for ours, peer in PEERS.items():
            if ours in running and peer in running:
                speedup, memory_ratio = ms[peer] / ms[ours], memory[ours]["peak_mib"] / memory[peer]["peak_mib"]
                met = "met" if speedup >= 2 and memory_ratio <= 1 else "not met"
                goals.append(f"- {length}: `{ours}` {speedup:.2f}x faster than `{peer}` at {memory_ratio:.2f}x its "
                             f"peak memory: goal (>= 2x faster at <= its memory) {met}")
        print(markdown_table(headers(base), [row for row in rows if row[0] == length]), flush=True)
    return rows, results, goals


def headers(base: str) -> list[str]:
    return ["N", "candidate", "step ms", f"time / {base}", "peak MiB", f"memory / {base}", "note"]


TITLES = {"layer": "One attention layer, forward + backward",
          "model": f"One training step of a {MODEL_LAYERS}-layer encoder (forward, backward, AdamW)"}


# ---- approximation quality --------------------------------------------------------------------------------------------
QUALITY_FAMILIES = {  # sized for the teacher's blocks (--block): each sees a fraction of them, as at longer lengths
    "full": lambda block: {"attention_type": "full"},
    "bigbird": lambda block: {"attention_type": "bigbird", "block_size": block // 16, "num_random_blocks": 2},
    "linformer": lambda block: {"attention_type": "linformer", "linformer_k": block // 8},
    "lsh": lambda block: {"attention_type": "lsh", "num_hashes": 2, "num_buckets": block // 16,
                          "lsh_chunk_length": block // 8, "hash_seed": 0},
    "sliding": lambda block: {"attention_type": "sliding_window", "attention_window": block // 4},
    "performer": lambda block: {"attention_type": "performer", "performer_nb_features": 64},
}


def finetune(model, blocks, tokenizer, steps: int, rows: int, lr: float) -> None:
    """All weights, AdamW, masked LM; the same seeded rows and masks for every model."""
    from bench_linearize import lm_batch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        chosen = torch.randint(0, len(blocks), (rows,), generator=generator)
        loss = model(**lm_batch(blocks[chosen], "mlm", tokenizer, step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def quality(args) -> tuple[str, dict]:
    from bench_linearize import bits_per_byte, data_blocks, pretrain_teacher

    from hf_xarch.train.evaluation import sample_rows

    teacher_args = SimpleNamespace(teacher_steps=args.teacher_steps, batch=args.batch, block=args.block,
                                   max_bytes=args.max_bytes, hidden=128, layers=2, heads=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        teacher, tokenizer, cfg, teacher_tokens = pretrain_teacher("mlm", teacher_args, Path(workdir))
    train, heldout, bytes_per_token = data_blocks(cfg, tokenizer, causal=False)
    chosen = sample_rows(len(heldout), args.heldout_blocks, seed=1234)
    heldout = heldout if chosen is None else heldout[chosen]
    teacher_seconds = time.perf_counter() - start
    rows, data = [], {"teacher_tokens": teacher_tokens, "heldout_blocks": len(heldout), "families": {}}
    full_before = full_after = None
    for name in args.families:
        options = QUALITY_FAMILIES[name](args.block)
        model, dropped, added = with_attention(teacher, **options)
        model.set_attn_implementation("sdpa")
        before = bits_per_byte(model, heldout, "mlm", tokenizer, bytes_per_token)
        finetune(model, train, tokenizer, args.finetune_steps, args.batch, args.finetune_lr)
        after = bits_per_byte(model, heldout, "mlm", tokenizer, bytes_per_token)
        if name == "full":
            full_before, full_after = before, after
        data["families"][name] = {"options": options, "before": before, "after": after, "dropped": dropped,
                                  "added": added}
        described = ", ".join(f"{k}={v}" for k, v in options.items() if k != "attention_type")
        rows.append([name, described or "-", before, after,
                     after / full_after if full_after else float("nan")])
        print(rows[-1], flush=True)
    data["seconds"] = time.perf_counter() - start
    table = markdown_table(["family", "options", "bits/byte swapped in", "after fine-tune",
                            "after / full after"], rows)
    text = (f"Teacher: masked-LM encoder, hidden 128, 2 layers, 4 heads, RoPE, blocks of {args.block} tokens, "
            f"{args.teacher_steps} steps of {args.batch} blocks ({teacher_tokens} tokens, {teacher_seconds:.0f} s "
            f"with its data). Fine-tune: {args.finetune_steps} steps of {args.batch} blocks, AdamW lr "
            f"{args.finetune_lr}, all weights. Held-out: {len(heldout)} blocks drawn at random (seed 1234) from the "
            f"held-out split, 15% masked with seeded masks; full attention before its fine-tune: "
            f"{full_before if full_before is not None else float('nan'):.4f} bits/byte.\n\n{table}\n")
    return text, data


def source_versions() -> dict:
    """The git commit, and a hash of each measured family's file as it is on disk now (uncommitted edits included)."""
    import hashlib
    import subprocess

    root = HERE.parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=False).stdout  # no git (an unpacked copy): an empty commit
    files = {name: root / "hf_xarch" / "model" / f"attention_{name}.py" for name in ("bigbird", "linformer", "lsh")}
    return {"git_head": head.strip(), **{f"attention_{name}.py sha1": hashlib.sha1(path.read_bytes()).hexdigest()[:12]
                                         for name, path in files.items()}}


# ---- entry point --------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["layer", "model", "quality"], default="layer")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--candidates", nargs="+", help="default: every candidate of the part")
    parser.add_argument("--repeats", type=int, default=3, help="0: time the memory child's measured step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=list(QUALITY_FAMILIES), choices=list(QUALITY_FAMILIES))
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, default=2_000_000)
    parser.add_argument("--teacher-steps", type=int, default=120)
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--heldout-blocks", type=int, default=32)
    parser.add_argument("--output", default="sparse")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_sparse.py " + " ".join(sys.argv[1:])
    if args.part == "quality":
        torch.manual_seed(0)
        text, data = quality(args)
        write_results(args.output, f"# Approximation quality against full attention\n\n`{command}`\n\n{text}",
                      {"args": vars(args), **data})
        return
    args.candidates = args.candidates or list(STEPS[args.part][1])
    unknown = sorted(set(args.candidates) - set(STEPS[args.part][1]))
    if unknown:
        parser.error(f"--candidates {unknown} are not candidates of --part {args.part}: {list(STEPS[args.part][1])}")
    base = "dense" if "dense" in args.candidates else args.candidates[0]  # the candidate the ratios divide by
    if any(skip_reason(args.part, base, length) for length in args.lengths):
        parser.error(f"{base}, the baseline of the ratios, cannot run at every length of {args.lengths}")
    sources = source_versions()  # before the run: the families' files may change while it goes on (shared trees)
    rows, results, goals = speed_rows(args, base)
    timing = (f"median of {args.repeats} interleaved steps" if args.repeats else
              "one step after a warm-up step, in the memory child")
    text = (f"# {TITLES[args.part]}\n\n`{command}`\n\nTime: {timing}. Memory: peak RSS growth of one step in a fresh "
            f"process.\n\n{markdown_table(headers(base), rows)}\n\n" + "\n".join(goals) + "\n")
    write_results(args.output, text, {"args": vars(args), "results": results, "goals": goals, "sources": sources})


if __name__ == "__main__":
    main()
