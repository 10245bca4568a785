"""The training loop's cost: recipe loop vs a bare PyTorch loop, and pretrain tokens/s with 1 and 2 processes.

1. **Loop overhead.** The pretrain recipe's model (hidden 128, 4 layers, 4 heads, RoPE, SwiGLU, RMSNorm) and
   tokenizer (byte-level BPE, 4096 tokens) on blocks of 128 tokens from the default corpus, micro-batch 8. The recipe's
   loop (``hf_xarch.train.loop.train``: Accelerate, item-weighted loss, clipping, LR schedule, logging every 10 steps,
   progress bar) against a bare PyTorch loop over the same model copy and the same batches (forward with labels,
   backward, clip, AdamW, scheduler, zero_grad). Chunks of steps alternate (loop, bare, bare, loop, ...); time per
   step comes from timestamps between consecutive steps, so per-chunk setup is not counted; median over all steps.
   Goal: ratio loop / bare <= 1.10.
2. **Throughput.** The whole ``pretrain`` recipe on the default corpus (``recipes/pretrain.py``, same model, global
   batch 16 blocks = 2048 tokens per step) as 1 process with 1 torch thread, 1 process with 2 threads (OpenMP's
   default wait policy, and ``OMP_WAIT_POLICY=PASSIVE``), and 2 processes x 1 thread through
   ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` (gloo, 8 blocks each). The setups run
   interleaved (round r runs them all, in an order that alternates), so a change in the machine's load hits all of
   them; each run records the load average when it started. Tokens/s is the recipe's own
   ``train/tokens_per_second`` (training time only), median over its log windows after the first; the table gives
   the median over rounds; the wall time includes start-up, tokenizer training and packing.

   Why the wait policy: with more runnable threads than free cores (other work on the machine), OpenMP threads that
   spin at a barrier burn the core their preempted partner needs, and every parallel region waits for a scheduler
   time slice. ``PASSIVE`` makes them sleep instead.

    python benchmarks/bench_train_loop.py                      # the full run (a few minutes on 2 cores)
    python benchmarks/bench_train_loop.py --quick              # a quick look
    python benchmarks/bench_train_loop.py --only throughput    # skip the loop-overhead part
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

import itertools

from common import RESULTS_DIR, bar_plot, environment, markdown_table, write_results

MODEL = ["model.hidden_size=128", "model.num_hidden_layers=4", "model.num_attention_heads=4",
         "model.intermediate_size=512", "data.block_size=128", "tokenizer.vocab_size=4096"]


# ---- 1. loop overhead ---------------------------------------------------------------------------------------------
def _setup(max_bytes: int):
    from hf_xarch.train.config import load_config, xarch_config_fields
    from hf_xarch.train.corpus import load_default_corpus
    from hf_xarch.train.data import pack_blocks
    from hf_xarch.train.pretrain import DEFAULTS, build_model
    from hf_xarch.train.tokenizer import train_tokenizer

    cfg = load_config(DEFAULTS, overrides=MODEL, open_sections={"model": xarch_config_fields()})
    texts = load_default_corpus(max_bytes=max_bytes)
    tokenizer = train_tokenizer(texts, vocab_size=cfg.tokenizer.vocab_size)
    blocks, _ = pack_blocks(texts, tokenizer, cfg.data.block_size)
    torch.manual_seed(0)
    return cfg, build_model(cfg, tokenizer), blocks


def _optimizer(model, steps: int):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=steps)


def loop_chunk(model, blocks, micro: int, steps: int, seed: int) -> list[float]:
    """`steps` steps of the recipe loop; seconds between consecutive steps (the first step pays the setup)."""
    from accelerate import Accelerator

    from hf_xarch.train.data import ExampleOrder
    from hf_xarch.train.loop import LoopSettings, train
    from hf_xarch.train.pretrain import make_lm_collate

    stamps: list[float] = []
    optimizer, scheduler = _optimizer(model, steps)
    settings = LoopSettings(max_steps=steps, micro_batch_size=micro, max_grad_norm=1.0, log_every=10, resume="never",
                            progress_bar=True, description="bench")
    train(Accelerator(cpu=True), model, optimizer, scheduler, ExampleOrder(examples=blocks, seed=seed),
          make_lm_collate("clm", None, 0.15, seed), settings, causal=True,
          callbacks=[lambda step, record: stamps.append(time.perf_counter())])
    return [b - a for a, b in itertools.pairwise(stamps)]


def bare_chunk(model, blocks, micro: int, steps: int, seed: int) -> list[float]:
    """The same steps as a bare PyTorch loop: the same batches (same seeded permutation), no framework."""
    optimizer, scheduler = _optimizer(model, steps)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed * 1_000_003)).tolist()
    model.train()
    stamps = []
    for step in range(steps):
        batch = blocks[order[step * micro : (step + 1) * micro]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]


def measure_overhead(rounds: int, steps: int, micro: int, max_bytes: int) -> dict:
    cfg, model, blocks = _setup(max_bytes)
    initial = copy.deepcopy(model.state_dict())
    times: dict[str, list[float]] = {"recipe loop": [], "bare PyTorch": []}
    runners = {"recipe loop": loop_chunk, "bare PyTorch": bare_chunk}
    names = list(runners)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            model.load_state_dict(initial)
            times[name] += runners[name](model, blocks, micro, steps, seed=index)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    return {
        "micro_batch": micro,
        "block_size": cfg.data.block_size,
        "steps_timed": {name: len(values) for name, values in times.items()},
        "median_ms": medians,
        "ratio": medians["recipe loop"] / medians["bare PyTorch"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# ---- 2. throughput ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SETUPS = {  # name: (processes, threads per process, OMP_WAIT_POLICY or None for OpenMP's default)
    "1 process x 1 thread": (1, 1, None),
    "1 process x 2 threads": (1, 2, None),
    "1 process x 2 threads, OMP_WAIT_POLICY=PASSIVE": (1, 2, "PASSIVE"),
    "2 processes x 1 thread": (2, 1, None),
}


def run_recipe(processes: int, threads: int, steps: int, global_batch: int, max_bytes: int,
               wait_policy: str | None = None, log_every: int = 10) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench_train_"))
    args = [*MODEL, f"training.max_steps={steps}", f"training.micro_batch_size={global_batch // processes}",
            f"data.max_bytes={max_bytes}", f"tokenizer.train_bytes={max_bytes}", f"logging.every_steps={log_every}",
            "logging.progress_bar=false", "evaluation.every_steps=0", "evaluation.max_batches=2",
            "evaluation.final_max_batches=2", "checkpoint.every_steps=0", "logging.tensorboard=false",
            f"output_dir={folder}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.pop("OMP_WAIT_POLICY", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    load = os.getloadavg()[0]
    script = str(REPO / "recipes" / "pretrain.py")
    if processes == 1:
        command = [sys.executable, script, *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), script, *args]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["train/tokens_per_second"] for r in records if "train/tokens_per_second" in r][1:]
    return {"tokens_per_second": statistics.median(speeds), "wall_seconds": wall,
            "final_loss": records[-1]["train/loss"], "steps": steps, "load_average_at_start": load}


def measure_throughput(rounds: int, steps: int, max_bytes: int, log_every: int) -> dict:
    """Every setup once per round, the order alternating between rounds; {setup: {median, runs}}."""
    runs: dict[str, list[dict]] = {name: [] for name in SETUPS}
    names = list(SETUPS)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            processes, threads, policy = SETUPS[name]
            run = run_recipe(processes, threads, steps, 16, max_bytes, policy, log_every)
            runs[name].append(run)
            print(f"round {index + 1} {name}: {run['tokens_per_second']:,.0f} tokens/s "
                  f"(whole run {run['wall_seconds']:.0f} s, load average {run['load_average_at_start']:.1f})",
                  flush=True)
    return {name: {"tokens_per_second": statistics.median(r["tokens_per_second"] for r in values),
                   "wall_seconds": statistics.median(r["wall_seconds"] for r in values),
                   "final_loss": values[-1]["final_loss"], "runs": values}
            for name, values in runs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="alternating chunks per candidate (overhead)")
    parser.add_argument("--chunk-steps", type=int, default=12, help="steps per chunk (overhead)")
    parser.add_argument("--steps", type=int, default=60, help="recipe steps per throughput run")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="interleaved rounds of every setup")
    parser.add_argument("--log-every", type=int, default=10, help="the recipe's log window (steps)")
    parser.add_argument("--max-bytes", type=int, default=2_000_000, help="default-corpus bytes")
    parser.add_argument("--only", choices=["overhead", "throughput"], help="run one part only")
    parser.add_argument("--quick", action="store_true", help="a quick look: fewer rounds and steps")
    parser.add_argument("--output", default="train_loop", help="results name under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.chunk_steps, args.steps, args.max_bytes = 2, 6, 21, 500_000
        args.throughput_rounds, args.log_every = 2, 4
    load_start = os.getloadavg()[0]

    torch.set_num_threads(1)
    sections, data, plot = [], {"args": vars(args)}, None
    if args.only != "throughput":
        overhead = data["overhead"] = measure_overhead(args.rounds, args.chunk_steps, micro=8,
                                                       max_bytes=args.max_bytes)
        print(f"loop overhead: recipe {overhead['median_ms']['recipe loop']:.1f} ms/step, bare "
              f"{overhead['median_ms']['bare PyTorch']:.1f} ms/step, ratio {overhead['ratio']:.3f} (goal <= 1.10)")
        sections += [
            f"## Loop overhead (1 thread, micro-batch 8, chunks interleaved; {overhead['parameters']:,} parameters)",
            "",
            markdown_table(["loop", "median ms / step", "steps timed"],
                           [[name, ms, overhead["steps_timed"][name]] for name, ms in overhead["median_ms"].items()]),
            "",
            f"Ratio recipe / bare: **{overhead['ratio']:.3f}** (goal <= 1.10).",
            "",
        ]
    if args.only != "overhead":
        throughput = data["throughput"] = measure_throughput(args.throughput_rounds, args.steps, args.max_bytes,
                                                             args.log_every)
        base = throughput["1 process x 1 thread"]["tokens_per_second"]
        rows = [[name, r["tokens_per_second"], r["tokens_per_second"] / base,
                 ", ".join(f"{run['tokens_per_second']:.0f}" for run in r["runs"]),
                 ", ".join(f"{run['load_average_at_start']:.1f}" for run in r["runs"]), r["wall_seconds"]]
                for name, r in throughput.items()]
        sections += [
            f"## Pretrain recipe throughput (global batch 16 x 128 tokens, {args.steps} steps, "
            f"{args.throughput_rounds} interleaved rounds)",
            "",
            markdown_table(["setup", "tokens/s (median)", "ratio vs 1x1", "tokens/s per round",
                            "load average at each start", "whole run (s, median)"], rows),
            "",
            "With other work on the machine (load above "
            "the core count), OpenMP's default wait policy lets a thread spin at each barrier on the core its "
            "preempted partner needs, so every parallel region waits for a scheduler time slice; "
            "`OMP_WAIT_POLICY=PASSIVE` (threads sleep at barriers) avoids that. The model here is full attention, so "
            "the sliding-window kernel's own thread pool plays no part.",
        ]
        plot = bar_plot(
            RESULTS_DIR / f"{args.output}.png",
            list(throughput),
            [("tokens / s", {"pretrain recipe": [r["tokens_per_second"] for r in throughput.values()]}),
             ("ratio vs 1 process x 1 thread",
              {"pretrain recipe": [r["tokens_per_second"] / base for r in throughput.values()]})],
            title="hf_xarch pretrain recipe throughput",
            reference_line=1.0,
        )
    markdown = "\n".join([
        "# Training loop: overhead and throughput",
        "",
        (f"Model: hidden 128, 4 layers, full attention; blocks of 128 tokens from the default corpus; "
         f"{environment().get('cpu_count', '?')} CPUs; load average {load_start:.1f} at the start and "
         f"{os.getloadavg()[0]:.1f} at the end (other work on the machine slows multi-threaded runs most)."),
        "",
        *sections,
    ])
    paths = write_results(args.output, markdown, data)
    print(markdown)
    print("saved:", ", ".join(str(p) for p in [*paths, *([plot] if plot else [])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
