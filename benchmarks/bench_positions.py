"""Positions: a Llama converted to XArch against the original, and ALiBi attention against unbiased SDPA and BLOOM.

Part ``llama``: ``LlamaForCausalLM`` (hidden 512, 4 layers, 8 query / 2 key-value heads, the default rope) converted
with ``hf_xarch.convert.from_hf``; both with ``attn_implementation="sdpa"``:

- one training step (forward + backward of the LM loss, batch 1) at each sequence length, original and converted
  interleaved in one process (``common.interleaved_timings``), median of the repeats; peak memory of each in its own
  fresh process (RSS high-water mark reset after the setup, ``STEADY_MALLOC_ENV``);
- greedy generation with the cache (a 32-token prompt, 64 new tokens), interleaved: tokens per second.
  Goal: XArch / Llama <= 1.0.

Part ``alibi``: attention with ALiBi (hidden 512, 8 heads x 64, batch 1) at N = 1024, 4096, 16384, forward +
backward:

- kernel level, on the same q, k, v: ``key_bias_flash_attention`` (the full family's default CPU path for a linear
  score bias) vs ``F.scaled_dot_product_attention`` without bias, causal (decoder) and symmetric (encoder, against
  bidirectional SDPA); step memory of each in its own fresh process. Goal at 4k and 16k: <= 1.3x the time and
  <= 2x the step memory of unbiased SDPA;
- layer level, projections included: XArch's attention with ALiBi vs the same layer without a bias (SDPA) vs
  transformers' ``BloomAttention`` with the bias tensor and float mask ``BloomModel`` builds per forward (the alibi
  tensor and the (N x N) mask are built inside the timed call, as BloomModel does). Peak memory of each layer in a
  fresh process: BLOOM materialises heads x N x N scores, XArch never more than heads x N of bias.

    python benchmarks/bench_positions.py                                  # the full run (about 15 minutes)
    python benchmarks/bench_positions.py --parts alibi --n 1024 --repeats 2 --output scratch   # a quick look
    python benchmarks/bench_positions.py --parts alibi --n 4096 16384 --kernel-only --repeats 2   # the ALiBi goal
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # `common` beside this file, whether run as a script or in a child process

from common import (
    RESULTS_DIR,
    STEADY_MALLOC_ENV,
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


# ---- part 1: Llama converted vs original ------------------------------------------------------------------------------
def build_llama(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, max_seq: int):
    """The original LlamaForCausalLM, seeded so that every process builds the same weights, and its conversion."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_xarch.convert import from_hf

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_seq,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    original = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    return original, from_hf(original)


def lm_step(network, ids: torch.Tensor) -> None:
    network.zero_grad(set_to_none=True)
    network(input_ids=ids, labels=ids).loss.backward()


def llama_memory(side: str, seq: int, threads: int, **build) -> dict:
    """In a fresh process: peak RSS of one training step of one side (both sides build and convert, then keep one,
    so both processes have the same allocator history)."""
    torch.set_num_threads(threads)
    original, converted = build_llama(**build)
    network = (converted if side == "xarch" else original).train()
    del original, converted
    ids = torch.randint(0, build["vocab"], (1, seq), generator=torch.Generator().manual_seed(1))
    release_freed_memory()
    before = current_rss_mib()
    exact = reset_peak_rss()
    lm_step(network, ids)
    peak = peak_rss_mib()
    return {"rss_before_mib": before, "peak_mib": peak, "step_mib": peak - before, "exact_reset": exact}


def run_llama(args: argparse.Namespace) -> dict:
    build = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
                 max_seq=max(args.seq))
    original, converted = build_llama(**build)
    rows = []
    for seq in args.seq:
        ids = torch.randint(0, args.vocab, (1, seq), generator=torch.Generator().manual_seed(1))
        original.train(), converted.train()
        times = interleaved_timings(
            {"llama": functools.partial(lm_step, original, ids), "xarch": functools.partial(lm_step, converted, ids)},
            repeats=args.repeats, warmup=args.warmup,
        )
        memory = {
            side: run_in_fresh_process(HERE, "llama_memory", dict(side=side, seq=seq, threads=args.threads, **build),
                                       threads=args.threads, env=STEADY_MALLOC_ENV)
            for side in ("llama", "xarch")
        }
        row = {"seq": seq, "llama_ms": median_ms(times["llama"]), "xarch_ms": median_ms(times["xarch"]),
               "llama_peak_mib": memory["llama"]["peak_mib"], "xarch_peak_mib": memory["xarch"]["peak_mib"],
               "llama_step_mib": memory["llama"]["step_mib"], "xarch_step_mib": memory["xarch"]["step_mib"],
               "times_s": times}
        row["time_ratio"] = row["xarch_ms"] / row["llama_ms"]
        row["peak_ratio"] = row["xarch_peak_mib"] / row["llama_peak_mib"]
        row["step_ratio"] = row["xarch_step_mib"] / max(row["llama_step_mib"], 1e-9)
        rows.append(row)
        print(f"llama train seq {seq:5d}: {row['llama_ms']:8.1f} / {row['xarch_ms']:8.1f} ms (x{row['time_ratio']:.3f})"
              f"  peak {row['llama_peak_mib']:7.1f} / {row['xarch_peak_mib']:7.1f} MiB (x{row['peak_ratio']:.3f})"
              f"  step {row['llama_step_mib']:7.1f} / {row['xarch_step_mib']:7.1f} MiB (x{row['step_ratio']:.3f})",
              flush=True)

    original.eval(), converted.eval()
    prompt = torch.randint(0, args.vocab, (1, 32), generator=torch.Generator().manual_seed(2))
    new = args.new_tokens
    generated = {}

    def generate(network, name):
        with torch.no_grad():
            generated[name] = network.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    times = interleaved_timings({"llama": lambda: generate(original, "llama"), "xarch": lambda: generate(converted, "xarch")},
                                repeats=args.repeats, warmup=args.warmup)
    generation = {"new_tokens": new, "same_tokens": bool(torch.equal(generated["llama"], generated["xarch"])),
                  "llama_tok_s": new / (median_ms(times["llama"]) / 1000), "xarch_tok_s": new / (median_ms(times["xarch"]) / 1000),
                  "times_s": times}
    generation["speed_ratio"] = generation["xarch_tok_s"] / generation["llama_tok_s"]
    print(f"llama greedy generation: {generation['llama_tok_s']:.1f} / {generation['xarch_tok_s']:.1f} tokens/s "
          f"(XArch speed x{generation['speed_ratio']:.3f}, same tokens: {generation['same_tokens']})", flush=True)
    return {"rows": rows, "generation": generation}


# ---- part 2: ALiBi attention ------------------------------------------------------------------------------------------
def attention_layers(hidden: int, heads: int):
    """XArch's attention with ALiBi, the same layer without a bias, and BLOOM's attention (same sizes, seeded)."""
    from transformers import BloomConfig
    from transformers.models.bloom.modeling_bloom import BloomAttention

    from hf_xarch import XArchConfig
    from hf_xarch.model.attention_full import XArchAttention
    from hf_xarch.model.position_alibi import AlibiPositionBias

    torch.manual_seed(0)
    layers = {}
    for name, scheme in (("xarch_alibi", "alibi"), ("xarch_sdpa", "none")):
        config = XArchConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=1, is_decoder=True,
                             position_embedding_type=scheme, max_position_embeddings=16384)
        config._attn_implementation = "sdpa"
        layers[name] = (XArchAttention(config, 0), AlibiPositionBias(config) if scheme == "alibi" else None)
    bloom_config = BloomConfig(hidden_size=hidden, n_head=heads, n_layer=1)
    bloom_config._attn_implementation = "eager"
    layers["bloom"] = (BloomAttention(bloom_config, layer_idx=0), bloom_config)
    return layers


def layer_step(name: str, layer, extra, hidden_states: torch.Tensor) -> None:
    """Forward + backward of one attention layer on ``hidden_states`` (batch 1, no padding)."""
    layer.zero_grad(set_to_none=True)
    hidden_states.grad = None
    seq = hidden_states.shape[1]
    if name == "bloom":
        from transformers.masking_utils import create_causal_mask
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

        # what BloomModel.forward builds for every forward without padding
        slopes = _get_alibi_slopes(extra.n_head, hidden_states.device)
        alibi = (slopes[:, None, None] * torch.arange(seq, device=hidden_states.device)).to(hidden_states.dtype)
        mask = create_causal_mask(config=extra, inputs_embeds=hidden_states, attention_mask=None, cache=None)
        output, _ = layer(hidden_states, torch.zeros_like(hidden_states), alibi, mask)
    else:
        positions = extra(hidden_states, torch.arange(seq)[None]) if extra is not None else None
        output, _ = layer(hidden_states, None, None, score_bias=positions)
    output.square().mean().backward()


def kernel_step(name: str, q, k, v, causal: bool) -> None:
    from hf_xarch.model.attention_full_kernels import key_bias_flash_attention
    from hf_xarch.model.position_alibi import AlibiBias, alibi_slopes

    for tensor in (q, k, v):
        tensor.grad = None
    if name == "sdpa":
        output = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        positions = torch.arange(q.shape[2], dtype=torch.float32)[None]
        bias = AlibiBias(alibi_slopes(q.shape[1]), positions, positions, symmetric=not causal)
        output = key_bias_flash_attention(q, k, v, bias, None, q.shape[-1] ** -0.5, causal)
    output.square().mean().backward()


def kernel_memory(name: str, seq: int, heads: int, head_dim: int, causal: bool, threads: int) -> dict:
    """In a fresh process: peak RSS of one kernel-level forward + backward (q, k, v and their gradients included)."""
    torch.set_num_threads(threads)
    q, k, v = qkv(heads, head_dim, seq)
    kernel_step(name, q, k, v, causal)  # a first step: the libraries' one-time buffers are not the step's memory
    release_freed_memory()
    before = current_rss_mib()
    exact = reset_peak_rss()
    kernel_step(name, q, k, v, causal)
    peak = peak_rss_mib()
    return {"rss_before_mib": before, "peak_mib": peak, "step_mib": peak - before, "exact_reset": exact}


def qkv(heads: int, head_dim: int, seq: int):
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(1, heads, seq, head_dim, generator=generator).requires_grad_() for _ in range(3)]


def alibi_memory(name: str, seq: int, hidden: int, heads: int, threads: int) -> dict:
    """In a fresh process: peak RSS of one forward + backward of one attention layer."""
    torch.set_num_threads(threads)
    layer, extra = attention_layers(hidden, heads)[name]
    hidden_states = torch.randn(1, seq, hidden, generator=torch.Generator().manual_seed(4)).requires_grad_()
    release_freed_memory()
    before = current_rss_mib()
    exact = reset_peak_rss()
    layer_step(name, layer, extra, hidden_states)
    peak = peak_rss_mib()
    return {"rss_before_mib": before, "peak_mib": peak, "step_mib": peak - before, "exact_reset": exact}


def run_alibi(args: argparse.Namespace) -> dict:
    heads, head_dim = args.heads, args.hidden // args.heads
    layers = attention_layers(args.hidden, heads)
    rows = []
    for seq in args.n:
        row = {"n": seq}
        for causal in (True, False):
            q, k, v = qkv(heads, head_dim, seq)
            times = interleaved_timings({name: functools.partial(kernel_step, name, q, k, v, causal)
                                         for name in ("sdpa", "alibi")}, repeats=args.repeats, warmup=args.warmup)
            kind = "causal" if causal else "bidirectional"
            row[f"kernel_{kind}_sdpa_ms"], row[f"kernel_{kind}_alibi_ms"] = (median_ms(times["sdpa"]),
                                                                             median_ms(times["alibi"]))
            row[f"kernel_{kind}_ratio"] = row[f"kernel_{kind}_alibi_ms"] / row[f"kernel_{kind}_sdpa_ms"]
            row[f"kernel_{kind}_times_s"] = times
            del q, k, v
            for name in ("sdpa", "alibi"):
                settings = {"name": name, "seq": seq, "heads": heads, "head_dim": head_dim, "causal": causal,
                            "threads": args.threads}
                memory = run_in_fresh_process(HERE, "kernel_memory", settings,
                                              threads=args.threads, env=STEADY_MALLOC_ENV)
                row[f"kernel_{kind}_{name}_step_mib"] = memory["step_mib"]
            row[f"kernel_{kind}_memory_ratio"] = (row[f"kernel_{kind}_alibi_step_mib"]
                                                  / max(row[f"kernel_{kind}_sdpa_step_mib"], 1e-9))
            print(f"alibi N {seq:5d} kernel {kind}: SDPA {row[f'kernel_{kind}_sdpa_ms']:.0f} ms / "
                  f"{row[f'kernel_{kind}_sdpa_step_mib']:.0f} MiB, ALiBi {row[f'kernel_{kind}_alibi_ms']:.0f} ms / "
                  f"{row[f'kernel_{kind}_alibi_step_mib']:.0f} MiB (time x{row[f'kernel_{kind}_ratio']:.2f}, memory "
                  f"x{row[f'kernel_{kind}_memory_ratio']:.2f})", flush=True)
        if args.kernel_only:
            rows.append(row)
            continue
        names = ["xarch_sdpa", "xarch_alibi"] + (["bloom"] if seq <= args.bloom_max_n else [])
        hidden_states = torch.randn(1, seq, args.hidden, generator=torch.Generator().manual_seed(4)).requires_grad_()
        times = interleaved_timings({name: functools.partial(layer_step, name, *layers[name], hidden_states)
                                     for name in names}, repeats=args.repeats, warmup=args.warmup)
        for name in names:
            row[f"layer_{name}_ms"] = median_ms(times[name])
            memory = run_in_fresh_process(HERE, "alibi_memory", dict(name=name, seq=seq, hidden=args.hidden, heads=heads,
                                                                     threads=args.threads),
                                          threads=args.threads, env=STEADY_MALLOC_ENV)
            row[f"layer_{name}_peak_mib"], row[f"layer_{name}_step_mib"] = memory["peak_mib"], memory["step_mib"]
        row["layer_time_ratio_vs_sdpa"] = row["layer_xarch_alibi_ms"] / row["layer_xarch_sdpa_ms"]
        row["layer_step_memory_ratio_vs_sdpa"] = row["layer_xarch_alibi_step_mib"] / max(row["layer_xarch_sdpa_step_mib"], 1e-9)
        if "bloom" in names:
            row["layer_time_ratio_vs_bloom"] = row["layer_xarch_alibi_ms"] / row["layer_bloom_ms"]
            row["layer_step_memory_ratio_vs_bloom"] = row["layer_xarch_alibi_step_mib"] / max(row["layer_bloom_step_mib"], 1e-9)
        rows.append(row)
        bloom_text = (f", BLOOM {row['layer_bloom_ms']:.0f} ms / {row['layer_bloom_step_mib']:.0f} MiB"
                      if "bloom" in names else "")
        print(f"alibi N {seq:5d}: kernel causal {row['kernel_causal_sdpa_ms']:.0f} -> {row['kernel_causal_alibi_ms']:.0f} ms "
              f"(x{row['kernel_causal_ratio']:.2f}), bidirectional {row['kernel_bidirectional_sdpa_ms']:.0f} -> "
              f"{row['kernel_bidirectional_alibi_ms']:.0f} ms (x{row['kernel_bidirectional_ratio']:.2f}); layer SDPA "
              f"{row['layer_xarch_sdpa_ms']:.0f} ms / {row['layer_xarch_sdpa_step_mib']:.0f} MiB, ALiBi "
              f"{row['layer_xarch_alibi_ms']:.0f} ms / {row['layer_xarch_alibi_step_mib']:.0f} MiB{bloom_text}", flush=True)
    return {"rows": rows}


# ---- report -----------------------------------------------------------------------------------------------------------
def report(results: dict, args: argparse.Namespace) -> None:
    env = environment()
    parts = [
        "# Positions: converted Llama vs LlamaForCausalLM; ALiBi attention vs unbiased SDPA and BLOOM",
        "",
        (f"{args.threads} torch thread(s), fp32, medians of {args.repeats} interleaved repeats after {args.warmup} "
        f"warm-up. Measured {env['date']} on {env['cpu']} ({env['cpu_count']} cores, load "
        f"{env.get('load_average_1min')}), torch {env['torch']}, transformers {env.get('transformers')}. Command: "
        f"`{' '.join(['python benchmarks/bench_positions.py', *sys.argv[1:]])}`"),
    ]
    panels = []
    if "llama" in results:
        llama = results["llama"]
        parts += [
            "",
            (f"## LlamaForCausalLM -> XArch (hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} "
            f"heads, vocab {args.vocab}, sdpa)"),
            "",
            ("Training step (LM loss, batch 1). Ratios XArch / Llama (< 1: XArch faster / smaller). step MiB: peak RSS "
            "of a fresh process during the step minus its RSS before (gradients and activations)."),
            "",
            markdown_table(
                ["seq", "Llama ms", "XArch ms", "time ratio", "Llama peak MiB", "XArch peak MiB", "peak ratio",
                 "Llama step MiB", "XArch step MiB", "step ratio"],
                [[r["seq"], r["llama_ms"], r["xarch_ms"], round(r["time_ratio"], 3), r["llama_peak_mib"],
                  r["xarch_peak_mib"], round(r["peak_ratio"], 3), r["llama_step_mib"], r["xarch_step_mib"],
                  round(r["step_ratio"], 3)] for r in llama["rows"]],
            ),
            "",
            (f"Greedy generation with the cache (prompt 32, {llama['generation']['new_tokens']} new tokens): Llama "
            f"{llama['generation']['llama_tok_s']:.1f} tokens/s, XArch {llama['generation']['xarch_tok_s']:.1f} "
            f"tokens/s (speed ratio {llama['generation']['speed_ratio']:.3f}); same tokens: "
            f"{llama['generation']['same_tokens']}."),
        ]
        panels.append(("Llama -> XArch: ratio XArch / Llama", [f"train {r['seq']}" for r in llama["rows"]] + ["generate"],
                       {"time (generate: 1 / speed)": [r["time_ratio"] for r in llama["rows"]]
                        + [1 / llama["generation"]["speed_ratio"]],
                        "peak memory": [r["peak_ratio"] for r in llama["rows"]] + [float("nan")]}))
    if "alibi" in results:
        rows = results["alibi"]["rows"]

        def get(row, key):
            return row.get(key, "-")

        parts += [
            "",
            f"## ALiBi attention (hidden {args.hidden}, {args.heads} heads, batch 1, forward + backward)",
            "",
            ("Kernel level (same q, k, v): `key_bias_flash_attention` vs `F.scaled_dot_product_attention` without a "
            "bias; causal (decoder) and bidirectional (encoder, symmetric ALiBi). step MiB: peak RSS of a fresh "
            "process during forward + backward minus its RSS before. Goal at 4k and 16k: time ratio <= 1.3, memory "
            "ratio <= 2."),
            "",
            markdown_table(
                ["N", "form", "SDPA ms", "ALiBi ms", "time ratio", "SDPA step MiB", "ALiBi step MiB", "memory ratio"],
                [[r["n"], form, r[f"kernel_{kind}_sdpa_ms"], r[f"kernel_{kind}_alibi_ms"],
                  round(r[f"kernel_{kind}_ratio"], 3), r[f"kernel_{kind}_sdpa_step_mib"],
                  r[f"kernel_{kind}_alibi_step_mib"], round(r[f"kernel_{kind}_memory_ratio"], 3)]
                 for r in rows for form, kind in (("causal", "causal"), ("symmetric", "bidirectional"))],
            ),
        ]
        layer_rows = [r for r in rows if "layer_xarch_sdpa_ms" in r]
        parts += [
            "",
            ("Layer level (causal, projections included; BLOOM builds its alibi tensor and float causal mask inside the "
            "call, as BloomModel does per forward). step MiB: peak RSS of a fresh process during forward + backward "
            "minus its RSS before."),
            "",
            markdown_table(
                ["N", "SDPA ms", "XArch ALiBi ms", "BLOOM ms", "ALiBi / SDPA", "ALiBi / BLOOM", "SDPA step MiB",
                 "ALiBi step MiB", "BLOOM step MiB", "ALiBi / SDPA mem", "ALiBi / BLOOM mem"],
                [[r["n"], r["layer_xarch_sdpa_ms"], r["layer_xarch_alibi_ms"], get(r, "layer_bloom_ms"),
                  round(r["layer_time_ratio_vs_sdpa"], 3), round(r["layer_time_ratio_vs_bloom"], 3)
                  if "layer_time_ratio_vs_bloom" in r else "-", r["layer_xarch_sdpa_step_mib"],
                  r["layer_xarch_alibi_step_mib"], get(r, "layer_bloom_step_mib"),
                  round(r["layer_step_memory_ratio_vs_sdpa"], 3),
                  round(r["layer_step_memory_ratio_vs_bloom"], 3) if "layer_step_memory_ratio_vs_bloom" in r else "-"]
                 for r in layer_rows],
            ),
        ] if layer_rows else []
        panels.append(("ALiBi: time ratio", [f"N={r['n']}" for r in rows], {
            "kernel causal / SDPA": [r["kernel_causal_ratio"] for r in rows],
            "kernel symmetric / SDPA": [r["kernel_bidirectional_ratio"] for r in rows],
            "kernel memory causal / SDPA": [r["kernel_causal_memory_ratio"] for r in rows],
            "kernel memory symmetric / SDPA": [r["kernel_bidirectional_memory_ratio"] for r in rows],
            "layer / SDPA layer": [r.get("layer_time_ratio_vs_sdpa", float("nan")) for r in rows],
            "layer / BLOOM layer": [r.get("layer_time_ratio_vs_bloom", float("nan")) for r in rows],
        }))
        if layer_rows:
            panels.append(("ALiBi layer: step memory (MiB)", [f"N={r['n']}" for r in layer_rows], {
                "SDPA (no bias)": [r["layer_xarch_sdpa_step_mib"] for r in layer_rows],
                "XArch ALiBi": [r["layer_xarch_alibi_step_mib"] for r in layer_rows],
                "BLOOM": [r.get("layer_bloom_step_mib", float("nan")) for r in layer_rows],
            }))
    markdown = "\n".join(parts)
    write_results(args.output, markdown, {"settings": vars(args), **results})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (title, groups, series) in zip(axes[0], panels):
        width = 0.8 / len(series)
        for index, (label, values) in enumerate(series.items()):
            xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
            axis.bar_label(axis.bar(xs, values, width, label=label), fmt="%.3g", fontsize=7)
        if "ratio" in title:
            axis.axhline(1.0, color="black", linestyle="--", linewidth=1)
        axis.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{args.output}.png", dpi=120)
    print(markdown)
    print(f"saved {RESULTS_DIR / args.output}.md, .json, .png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["llama", "alibi"], default=["llama", "alibi"])
    parser.add_argument("--seq", nargs="+", type=int, default=[512, 1024, 2048], help="Llama training lengths")
    parser.add_argument("--n", nargs="+", type=int, default=[1024, 4096, 16384], help="ALiBi lengths")
    parser.add_argument("--kernel-only", action="store_true", help="ALiBi: the kernel level only (no layers, BLOOM)")
    parser.add_argument("--bloom-max-n", type=int, default=8192, help="skip BLOOM above this N (heads x N^2 scores)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000, help="Llama vocabulary (small: the layers, not the "
                                                                 "output layer, are what differs)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", default="bench_positions", help="results file stem under benchmarks/results/")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    torch.set_num_threads(arguments.threads)
    outcome = {}
    if "llama" in arguments.parts:
        outcome["llama"] = run_llama(arguments)
    if "alibi" in arguments.parts:
        outcome["alibi"] = run_alibi(arguments)
    report(outcome, arguments)
