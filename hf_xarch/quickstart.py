"""``hf-xarch quickstart``: a few minutes of pretraining on 2 CPU cores, start to finish, offline.

Trains a tokenizer and a tiny causal XArch model (RoPE, full attention, RMSNorm, SwiGLU) on the default corpus (text
and code from this Python's standard library), writes everything into ``./xarch-quickstart`` (model, tokenizer, card,
JSONL + TensorBoard logs, loss plot), reloads the model with ``AutoModelForCausalLM`` / ``AutoModel``, checks that the
reloaded model gives the trained model's logits, generates a sample, and prints what it did and where.

It is the pretrain recipe with smaller defaults: ``hf-xarch quickstart key=value ...`` overrides them the same way
(e.g. ``training.max_steps=50`` or ``output_dir=/tmp/qs``).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

QUICKSTART = {
    "output_dir": "xarch-quickstart",
    "model": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 384,
        "max_position_embeddings": 128,
    },
    "data": {"max_bytes": 2_000_000, "block_size": 128},
    "tokenizer": {"vocab_size": 2048, "train_bytes": 2_000_000},
    "training": {"max_steps": 150, "micro_batch_size": 16},
    "optimizer": {"lr": 2.0e-3},
    "schedule": {"warmup_steps": 20},
    "evaluation": {"every_steps": 50, "max_batches": 8},
    "checkpoint": {"every_steps": 0, "resume": "never"},
    "logging": {"every_steps": 10},
}
PROMPT = "def "


def quickstart_defaults() -> dict:
    from .train.config import merge, xarch_config_fields
    from .train.pretrain import DEFAULTS

    return merge(copy.deepcopy(DEFAULTS), QUICKSTART, {"model": xarch_config_fields()})


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    import hf_xarch  # noqa: F401  (registers the Auto classes)

    from .train.config import parse_args, xarch_config_fields
    from .train.evaluation import format_scores
    from .train.pretrain import run_pretrain

    cfg = parse_args(argv, quickstart_defaults(), __doc__, open_sections={"model": xarch_config_fields()})
    if cfg is None:
        return 0
    started = time.perf_counter()
    result = run_pretrain(cfg)
    if not result.written:  # not the main process of a multi-process launch
        return 0
    folder = result.output_dir.resolve()
    trained = result.loop.model.eval()

    # reload the way a user would, and check the round trip
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    bare = AutoModel.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    probe = tokenizer("import os\nprint(os.getcwd())", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        same = torch.allclose(trained(input_ids=probe).logits, reloaded(input_ids=probe).logits, atol=1e-5)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    torch.manual_seed(cfg.seed)
    room = max(1, min(48, reloaded.config.max_position_embeddings - inputs["input_ids"].shape[1]))  # stay within the trained length
    generated = reloaded.generate(
        **inputs, max_new_tokens=room, do_sample=True, top_k=20, temperature=0.8, pad_token_id=tokenizer.pad_token_id
    )
    sample = tokenizer.decode(generated[0], skip_special_tokens=True)

    history = result.loop.history
    losses = [r["train/loss"] for r in history if "train/loss" in r]
    speeds = [r["train/tokens_per_second"] for r in history if "train/tokens_per_second" in r]
    parameters = sum(p.numel() for p in reloaded.parameters())
    config = reloaded.config
    metrics = result.eval_metrics
    written = result.written
    lines = [
        "",
        f"hf-xarch quickstart: done in {time.perf_counter() - started:.0f} s",
        (f"  model      XArchForCausalLM, {parameters / 1e6:.2f} M parameters: {config.num_hidden_layers} layers x "
        f"{config.hidden_size} wide, {config.attention_type} attention, {config.position_embedding_type} positions, "
        f"vocabulary {config.vocab_size} (a byte-level BPE trained just now)"),
        (f"  data       {result.train_tokens:,} training tokens from the default corpus "
        f"(Python standard library text and code), blocks of {cfg.data.block_size}"),
        f"  training   {result.loop.step} steps x {cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps}"
        f" blocks; train loss (mean over each log window) {losses[0]:.2f} -> {losses[-1]:.2f}; "
        f"{sum(speeds) / max(len(speeds), 1):,.0f} tokens/s"
        if losses else f"  training   {result.loop.step} steps",
        f"  held-out   {format_scores(metrics)}" if metrics else "  held-out   not evaluated (no held-out text)",
        f"  reloaded   AutoModelForCausalLM / AutoModel from {folder}: "
        + ("same logits as the trained model" if same else "LOGITS DIFFER from the trained model"),
        f"  sample     {sample!r}",
        f"  written    {folder}/",
    ]
    for what in ("model", "tokenizer", "card", "config", "eval_results", "plot"):
        if what in written:
            path = Path(written[what]).resolve()
            shown = path.relative_to(folder) if path != folder else "./ (config.json, model.safetensors)"
            lines.append(f"               {what:<13}{shown}")
    lines.append(f"               {'logs':<13}logs/metrics.jsonl, logs/tensorboard/  (tensorboard --logdir {folder / 'logs'})")
    lines += [
        "  next       hf-xarch pretrain --config recipes/configs/pretrain_clm.yaml   (see recipes/README.md)",
        "",
    ]
    print("\n".join(lines))
    del bare
    return 0 if same else 1
