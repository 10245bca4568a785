"""Linearizing a trained softmax LM (issue 18): attention transfer and LoRA against FAVOR+ and the mean(v) baseline.

One run, in one process on 1 torch thread:
1. a softmax teacher pretrained by the pretrain recipe on the default corpus (a causal decoder; with ``--encoder`` also
   a masked-LM encoder);
2. each layer's relative attention-output error ||linear - softmax|| / ||softmax|| on held-out text, on the layer's
   own (teacher) input: hedgehog, t2r and the hybrid (linear_sliding, hedgehog, window ``--window``) after attention
   transfer, FAVOR+ with m = 256 random features (nothing to train), and mean(v) (attention replaced by the mean of
   the visible values, then o_proj);
3. bits per byte on held-out text: the teacher; FAVOR+ swapped in untrained; FAVOR+ with the same LoRA budget;
   hedgehog and hybrid after transfer only, and after transfer + LoRA; the tokens each stage used as a share of the
   teacher's training tokens (masked LM: the masked-token loss per byte of text, with 15% of tokens masked);
4. decoding after a ``--context``-token prompt: tokens/s (CPU time, 1 thread) and cache MiB, teacher (KV cache) against
   the pure hedgehog and the hybrid (fixed state; plus window keys).

    python benchmarks/bench_linearize.py                       # the default scale (a few minutes on 2 idle cores)
    python benchmarks/bench_linearize.py --encoder --output linearize_encoder

Results: ``benchmarks/results/<output>.{md,json}``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_results

from hf_xarch.linearize import LayerCapture, attention_errors, attention_layers, attention_transfer, linearize
from hf_xarch.model.attention_full import repeat_kv


# ---- the teacher and its data -----------------------------------------------------------------------------------------
def pretrain_teacher(task: str, args, output_dir: Path):
    from hf_xarch.train.config import load_config, xarch_config_fields
    from hf_xarch.train.pretrain import DEFAULTS, run_pretrain

    overrides = [f"task={task}", f"output_dir={output_dir}", f"training.max_steps={args.teacher_steps}",
                 f"training.micro_batch_size={args.batch}", f"data.block_size={args.block}",
                 f"data.max_bytes={args.max_bytes}", "data.heldout_fraction=0.1", f"model.hidden_size={args.hidden}",
                 f"model.intermediate_size={4 * args.hidden}", f"model.num_hidden_layers={args.layers}",
                 f"model.num_attention_heads={args.heads}", f"model.max_position_embeddings={args.block}",
                 "checkpoint.every_steps=0", "evaluation.every_steps=0", "logging.progress_bar=false",
                 "logging.tensorboard=false", "optimizer.lr=3e-3", "schedule.warmup_steps=20"]
    if task == "mlm":
        overrides += ["model.is_decoder=false"]
    cfg = load_config(DEFAULTS, overrides=overrides, open_sections={"model": xarch_config_fields()})
    result = run_pretrain(cfg)
    return result.loop.model.eval(), result.tokenizer, cfg, args.teacher_steps * args.batch * args.block


def data_blocks(cfg, tokenizer, causal: bool):
    from hf_xarch.train.data import load_records, pack_blocks

    records = load_records(cfg.data, cfg.seed)
    column = cfg.data.text_column
    train, _ = pack_blocks([r[column] for r in records.train], tokenizer, cfg.data.block_size, causal)
    heldout, counts = pack_blocks([r[column] for r in records.heldout], tokenizer, cfg.data.block_size, causal)
    return train, heldout, counts["bytes"] / counts["tokens"]


def lm_batch(blocks, task: str, tokenizer, seed: int):
    from hf_xarch.train.pretrain import make_lm_collate

    return make_lm_collate(task, tokenizer, 0.15, seed)(list(blocks), seed)


@torch.no_grad()
def bits_per_byte(model, blocks, task: str, tokenizer, bytes_per_token: float, rows: int = 16) -> float:
    """Held-out loss per predicted token (causal: every next token; masked: the masked ones, a seeded 15%), in bits
    per byte of text."""
    model.eval()
    total, count = 0.0, 0
    for index, start in enumerate(range(0, len(blocks), rows)):
        batch = lm_batch(blocks[start : start + rows], task, tokenizer, index)
        labels = batch["labels"][:, 1:] if task == "clm" else batch["labels"]
        items = int(labels.ne(-100).sum())
        total += float(model(**batch).loss) * items
        count += items
    return total / count / math.log(2) / bytes_per_token


# ---- the baseline -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def mean_value_errors(teacher, batches) -> list[float]:
    """Each layer's error when its attention is replaced by the mean of the values it may see (uniform attention)."""
    squared, norms = None, None
    for batch in batches:
        capture = LayerCapture(attention_layers(teacher))
        try:
            teacher(input_ids=batch["input_ids"])
        finally:
            capture.remove()
        errors, sizes = [], []
        for layer, (hidden, _, target) in zip(attention_layers(teacher), capture.records):
            shape = (*hidden.shape[:-1], -1, layer.head_dim)
            value = repeat_kv(layer.v_proj(hidden).view(shape).transpose(1, 2), layer.num_key_value_groups)
            if layer.is_causal:
                counts = torch.arange(1, value.shape[2] + 1, dtype=value.dtype)[:, None]
                mean = value.cumsum(2) / counts
            else:
                mean = value.mean(2, keepdim=True).expand_as(value)
            output = layer.o_proj(mean.transpose(1, 2).reshape(*hidden.shape[:-1], -1))
            errors.append(float((output - target).square().sum()))
            sizes.append(float(target.square().sum()))
        squared = errors if squared is None else [a + b for a, b in zip(squared, errors)]
        norms = sizes if norms is None else [a + b for a, b in zip(norms, sizes)]
    return [(e / n) ** 0.5 for e, n in zip(squared, norms)]


# ---- the stages -------------------------------------------------------------------------------------------------------
def lora_finetune(model, blocks, task: str, tokenizer, steps: int, rows: int, lr: float = 1e-3):
    """LoRA (PEFT, r = 8 on q/k/v/o) on the model's own objective; returns the merged model."""
    from peft import LoraConfig, get_peft_model

    from hf_xarch import PEFT_TARGET_MODULES

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(PEFT_TARGET_MODULES)))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        chosen = torch.randint(0, len(blocks), (rows,), generator=generator)
        loss = peft_model(**lm_batch(blocks[chosen], task, tokenizer, step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return peft_model.merge_and_unload().eval()


def transfer_batches(blocks, steps: int, rows: int):
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": blocks[torch.randint(0, len(blocks), (rows,), generator=generator)]} for _ in range(steps)]


# ---- decoding ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def decoding(model, context: int, new_tokens: int) -> dict:
    from transformers import DynamicCache

    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache(config=model.config)
    start = time.process_time()
    token = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    prefill = time.process_time() - start
    start = time.process_time()
    for _ in range(new_tokens):
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    decode = time.process_time() - start
    cache_bytes = 0
    for layer in cache.layers:  # a KV layer's keys and values, or every tensor of a recurrent layer's state
        tensors = getattr(layer, "tensors", None) or (getattr(layer, "keys", None), getattr(layer, "values", None))
        cache_bytes += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return {"tokens_per_s": new_tokens / decode, "cache_mib": cache_bytes / 2**20, "prefill_s": prefill}


# ---- the run ----------------------------------------------------------------------------------------------------------
def students(teacher, args) -> dict:
    return {
        "hedgehog": lambda: linearize(teacher, "linear", "hedgehog"),
        "t2r": lambda: linearize(teacher, "linear", "t2r"),
        "hybrid": lambda: linearize(teacher, "linear_sliding", "hedgehog", window=args.window),
    }


def decoding_only(args) -> dict:
    """Decoding alone (its speed and cache do not depend on training): the teacher's shape, untrained."""
    from hf_xarch import XArchConfig, XArchForCausalLM

    torch.manual_seed(0)
    teacher = XArchForCausalLM(XArchConfig(
        vocab_size=4096, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, max_position_embeddings=args.block, position_embedding_type="rope",
        norm_type="rmsnorm", mlp_type="gated", hidden_act="silu", is_decoder=True)).eval()
    result = {"teacher (KV cache)": decoding(teacher, args.context, args.new_tokens)}
    for name in ("hedgehog", "hybrid"):
        result[name] = decoding(students(teacher, args)[name]().eval(), args.context, args.new_tokens)
    return {"decoding": result}


def run_task(task: str, args, workdir: Path) -> dict:
    causal = task == "clm"
    started = time.perf_counter()
    teacher, tokenizer, cfg, teacher_tokens = pretrain_teacher(task, args, workdir / task)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    train, heldout, bytes_per_token = data_blocks(cfg, tokenizer, causal)
    heldout = heldout[: args.heldout_blocks]
    error_batches = [{"input_ids": heldout[i : i + 16]} for i in range(0, len(heldout), 16)]
    bpb = lambda model: bits_per_byte(model, heldout, task, tokenizer, bytes_per_token)
    transfer_tokens = args.transfer_steps * args.batch * args.block
    lora_tokens = args.lora_steps * args.batch * args.block
    errors = {"mean(v)": mean_value_errors(teacher, error_batches)}
    favor = linearize(teacher, "linear", "favor+", feature_dim=256).eval()
    errors["FAVOR+ m=256"] = attention_errors(favor, teacher, error_batches)
    rows = [["teacher (softmax)", bpb(teacher), 1.0, 1.0]]
    rows.append(["FAVOR+ m=256, no training", bpb(favor), None, 0.0])
    rows.append(["FAVOR+ m=256 + LoRA", bpb(lora_finetune(favor, train, task, tokenizer, args.lora_steps, args.batch)),
                 None, lora_tokens / teacher_tokens])
    trained = {}
    for name, build in students(teacher, args).items():
        if name == "t2r" and not causal:
            continue
        student = build()
        attention_transfer(student, teacher, transfer_batches(train, args.transfer_steps, args.batch),
                           args.transfer_steps, lr=args.transfer_lr)
        errors[f"{name} after transfer"] = attention_errors(student.eval(), teacher, error_batches)
        if name == "t2r":
            continue
        rows.append([f"{name}, transfer only", bpb(student), None, transfer_tokens / teacher_tokens])
        tuned = lora_finetune(student, train, task, tokenizer, args.lora_steps, args.batch)
        rows.append([f"{name}, transfer + LoRA", bpb(tuned), None, (transfer_tokens + lora_tokens) / teacher_tokens])
        trained[name] = tuned
    for row in rows:
        row[2] = row[1] / rows[0][1]
    result = {"teacher_parameters": sum(p.numel() for p in teacher.parameters()), "teacher_tokens": teacher_tokens,
              "errors": errors, "bits_per_byte": rows}
    if causal and args.context:
        result["decoding"] = {"teacher (KV cache)": decoding(teacher, args.context, args.new_tokens)}
        for name in ("hedgehog", "hybrid"):
            result["decoding"][name] = decoding(trained[name], args.context, args.new_tokens)
    result["seconds"] = time.perf_counter() - started
    return result


def report(task: str, result: dict, args) -> str:
    title = "causal decoder" if task == "clm" else "masked-LM encoder"
    errors = result["errors"]
    layers = len(next(iter(errors.values())))
    mean_v = sum(errors["mean(v)"]) / layers
    lines = [(f"## {title}: teacher {result['teacher_parameters'] / 1e6:.2f}M parameters, "
             f"{result['teacher_tokens']} training tokens ({result['seconds']:.0f} s)"), "",
             "Relative attention-output error per layer on held-out text (and the mean as a multiple of mean(v)'s):", "",
             markdown_table(["method", *[f"layer {i}" for i in range(layers)], "mean", "x mean(v)"],
                            [[name, *values, sum(values) / layers, sum(values) / layers / mean_v]
                             for name, values in errors.items()]), "",
             "Bits per byte on held-out text" + (" (masked tokens, 15% masked)" if task == "mlm" else "") + ":", "",
             markdown_table(["model", "bits/byte", "x teacher", "tokens / teacher's"], result["bits_per_byte"])]
    if "decoding" in result:
        lines += ["", decoding_table(result, args)]
    return "\n".join(lines)


def decoding_table(result: dict, args) -> str:
    teacher = result["decoding"]["teacher (KV cache)"]
    return "\n".join([
        f"Decoding after {args.context} tokens ({args.new_tokens} steps, 1 thread, CPU time):", "",
        markdown_table(["model", "tokens/s", "x teacher", "cache MiB", "x teacher's cache"],
                       [[name, d["tokens_per_s"], d["tokens_per_s"] / teacher["tokens_per_s"], d["cache_mib"],
                         d["cache_mib"] / teacher["cache_mib"]] for name, d in result["decoding"].items()])])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, default=2_000_000)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--transfer-steps", type=int, default=60)
    parser.add_argument("--transfer-lr", type=float, default=1e-2)
    parser.add_argument("--lora-steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--heldout-blocks", type=int, default=64)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--encoder", action="store_true", help="also the masked-LM encoder")
    parser.add_argument("--decode-only", action="store_true", help="only the decoding table (untrained weights)")
    parser.add_argument("--output", default="linearize")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results, sections = {}, []
    if args.decode_only:
        results["clm"] = decoding_only(args)
        sections.append(decoding_table(results["clm"], args))
        print(sections[-1], flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        for task in () if args.decode_only else ("clm", "mlm") if args.encoder else ("clm",):
            results[task] = run_task(task, args, Path(workdir))
            sections.append(report(task, results[task], args))
            print(sections[-1], flush=True)
    header = (f"# bench_linearize\n\n`python benchmarks/bench_linearize.py {' '.join(argv or sys.argv[1:])}`\n")
    write_results(args.output, header + "\n" + "\n\n".join(sections), {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
