"""Pretrain a causal (``task: clm``) or masked (``task: mlm``) XArch language model from scratch.

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain_clm.yaml training.max_steps=500
    hf-xarch pretrain data.files=[my.txt] model.attention_type=full

The recipe, top to bottom: read the text (default corpus, local files or a Hub dataset) -> train or load a tokenizer
-> pack the text into blocks of ``data.block_size`` tokens -> build the model from the ``model`` section -> train with
the shared loop (``hf_xarch.train.loop``) -> evaluate loss, perplexity and bits per byte on held-out text -> save
model, tokenizer, card, logs and a loss plot into ``output_dir``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import (
    COMMON_SECTIONS,
    check_common,
    check_length,
    check_model_section,
    eval_result_entries,
    get_tokenizer,
    loop_settings,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    save_outputs,
)
from .config import Config, parse_args, xarch_config_fields
from .data import ExampleOrder, load_records, mask_for_mlm, pack_blocks, stream_blocks
from .evaluation import check_evaluation, evaluate_lm, format_scores
from .loop import LoopResult, train
from .tokenizer import check_tokenizer_for_task
from .tracking import MetricsLogger

TASKS = ("clm", "mlm")
# saved in config.json: the block size the recipe trained at, which max_position_embeddings need not be (a model can
# be built for 256 positions and trained on 128-token blocks); extend-context reads it as the trained length L
TRAINED_LENGTH_FIELD = "trained_sequence_length"

DEFAULTS = {
    **copy.deepcopy(COMMON_SECTIONS),
    "output_dir": "runs/pretrain",
    "task": "clm",  # clm (causal, XArchForCausalLM) | mlm (masked, XArchForMaskedLM)
    "model": {  # any XArchConfig field; vocab_size and special-token ids come from the tokenizer
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 256,
        "position_embedding_type": "rope",
        "attention_type": "full",
        "norm_type": "rmsnorm",
        "mlp_type": "gated",
        "hidden_act": "silu",
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    },
    "data": {
        "files": [],  # local .txt/.md/.py/.json/.jsonl/.csv/.parquet files; empty (and no dataset): the default corpus
        "dataset": None,  # a Hub dataset name (needs a connection)
        "dataset_config": None,
        "split": "train",
        "text_column": "text",
        "sample_by": "document",  # text files: one record per document | paragraph | line
        "streaming": False,  # tokenize and pack while training instead of up front (large inputs)
        "shuffle_buffer": 10_000,  # streamed records are shuffled in a buffer this big, afresh every epoch
        "heldout_fraction": 0.05,
        "heldout_records": 200,  # streamed data: the first records are held out (its length is unknown)
        "max_bytes": 8_000_000,  # default corpus: how much of it to use
        "max_examples": 0,  # 0: all records
        "block_size": 128,
    },
    "mlm_probability": 0.15,
}


@dataclass
class PretrainResult:
    output_dir: Path
    loop: LoopResult
    eval_metrics: dict
    written: dict
    tokenizer: object
    model_config: object
    train_tokens: int  # tokens in the packed training data (in memory), 0 when streamed


def build_model(cfg, tokenizer):
    """The model from the ``model`` section, sized to the tokenizer (vocabulary and special-token ids)."""
    from ..model.configuration_xarch import XArchConfig
    from ..model.modeling_xarch import XArchForCausalLM, XArchForMaskedLM

    fields = dict(cfg.model)
    vocab = len(tokenizer)
    if fields.get("vocab_size") is not None and fields["vocab_size"] < vocab:
        raise ValueError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's {vocab} tokens")
    fields.setdefault("vocab_size", vocab)
    fields["is_decoder"] = cfg.task == "clm"
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    config = XArchConfig(**fields)
    check_length(cfg.data.block_size, config)
    model_class = XArchForCausalLM if cfg.task == "clm" else XArchForMaskedLM
    return model_class(config)


def make_lm_collate(task: str, tokenizer, mlm_probability: float, seed: int) -> Callable[[list, int], dict]:
    """Stack blocks into a batch; for MLM, mask with a generator seeded by (seed, step) so masks are the same after
    a resume and for any number of processes."""

    def collate(blocks: list, step: int) -> dict:
        input_ids = torch.stack(blocks)
        if task == "clm":
            return {"input_ids": input_ids, "labels": input_ids}
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        inputs, labels = mask_for_mlm(input_ids, tokenizer, mlm_probability, generator)
        return {"input_ids": inputs, "labels": labels}

    return collate


def check_config(cfg) -> None:
    check_common(cfg)
    check_evaluation(cfg)
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not allowed: one of {list(TASKS)}")
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction={cfg.data.heldout_fraction} is not allowed: in [0, 1)")
    if cfg.data.block_size < 2:
        raise ValueError(f"data.block_size={cfg.data.block_size} is not allowed: at least 2")
    if cfg.task == "mlm" and not 0.0 < cfg.mlm_probability < 1.0:
        raise ValueError(f"mlm_probability={cfg.mlm_probability} is not allowed: in (0, 1)")
    check_model_section(cfg.model, is_decoder=cfg.task == "clm")


def run_pretrain(cfg: Config, callbacks: Iterable[Callable[[int, dict], None]] = (), model=None, tokenizer=None,
                 base_model: str | None = None, description: str | None = None) -> PretrainResult:
    """Run the recipe for a resolved config. `model`/`tokenizer` may be given (context extension continues training a
    loaded model); otherwise both are built from the config. `description` labels the progress bar (compare names
    each model there)."""
    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    causal = cfg.task == "clm"
    records = load_records(cfg.data, cfg.seed)
    column = cfg.data.text_column
    train_texts = (lambda: (r[column] for r in records.train)) if records.train is not None else (
        lambda: (r[column] for r in records.stream(0))
    )
    if tokenizer is None:
        tokenizer = get_tokenizer(cfg, train_texts, output_dir, causal, accelerator)
    check_tokenizer_for_task(tokenizer, cfg.task)
    if model is None:
        model = build_model(cfg, tokenizer)
    else:
        check_length(cfg.data.block_size, model.config)

    heldout_texts = [r[column] for r in records.heldout]
    heldout_blocks, heldout_counts = pack_blocks(heldout_texts, tokenizer, cfg.data.block_size, causal)
    if cfg.data.heldout_fraction > 0 and len(heldout_blocks) == 0:
        raise ValueError(
            f"the held-out text ({heldout_counts['tokens']} tokens) is shorter than one block of "
            f"data.block_size={cfg.data.block_size}; raise data.heldout_fraction or lower the block size"
        )
    train_tokens = 0
    if records.train is not None:
        blocks, counts = pack_blocks(list(train_texts()), tokenizer, cfg.data.block_size, causal)
        if len(blocks) == 0:
            raise ValueError(
                f"the training text ({counts['tokens']} tokens) is shorter than one block of "
                f"data.block_size={cfg.data.block_size}: the dataset is (nearly) empty"
            )
        train_tokens = blocks.numel()
        order = ExampleOrder(examples=blocks, seed=cfg.seed)
    else:
        order = ExampleOrder(
            stream=lambda epoch: stream_blocks((r[column] for r in records.stream(epoch)), tokenizer,
                                               cfg.data.block_size, causal),
            seed=cfg.seed,
        )
    bytes_per_token = heldout_counts["bytes"] / heldout_counts["tokens"] if heldout_counts["tokens"] else None

    def evaluate(trained, max_batches=cfg.evaluation.max_batches):
        if len(heldout_blocks) == 0:
            return {}
        return evaluate_lm(
            accelerator,
            trained,
            heldout_blocks,
            cfg.evaluation.batch_size,
            task=cfg.task,
            tokenizer=tokenizer,
            mlm_probability=cfg.mlm_probability,
            bytes_per_token=bytes_per_token,
            max_batches=max_batches or None,
            sample_seed=cfg.seed,
        )

    def evaluate_final(trained):  # the reported figure: the whole held-out set unless the config limits it
        return evaluate(trained, cfg.evaluation.final_max_batches)

    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    logger = MetricsLogger(
        output_dir / "logs",
        enabled=accelerator.is_main_process,
        tensorboard=cfg.logging.tensorboard,
        jsonl=cfg.logging.jsonl,
    )
    result = train(
        accelerator,
        model,
        optimizer,
        scheduler,
        order,
        make_lm_collate(cfg.task, tokenizer, cfg.mlm_probability, cfg.seed),
        loop_settings(cfg, output_dir, description=description or f"pretrain ({cfg.task})"),
        causal=causal,
        evaluate=evaluate,
        final_evaluate=evaluate_final,
        logger=logger,
        callbacks=callbacks,
    )
    logger.close()
    setattr(result.model.config, TRAINED_LENGTH_FIELD, cfg.data.block_size)
    eval_metrics = result.final_eval or evaluate_final(result.model)
    task_type = "text-generation" if causal else "fill-mask"
    written = save_outputs(
        accelerator,
        result.model,
        tokenizer,
        cfg,
        output_dir,
        result.history,
        eval_results=eval_result_entries(eval_metrics, task_type, "held-out " + _dataset_name(cfg)),
        datasets=cfg.data.dataset,
        base_model=base_model,
        training_summary=f"{result.step} steps of {cfg.task.upper()} pretraining on {records.description}.",
        plot_title=f"{cfg.task} pretraining",
        state_dict=result.state_dict,
    )
    return PretrainResult(output_dir, result, eval_metrics, written, tokenizer, result.model.config, train_tokens)


def _dataset_name(cfg) -> str:
    if cfg.data.dataset:
        return cfg.data.dataset
    if cfg.data.files:
        return ", ".join(Path(name).name for name in cfg.data.files)
    return "hf_xarch default corpus"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, DEFAULTS, __doc__, open_sections={"model": xarch_config_fields()})
    if cfg is None:
        return 0
    result = run_pretrain(cfg)
    if result.written:
        print(f"pretrain: {result.loop.step} steps; held-out {format_scores(result.eval_metrics)}; "
              f"saved to {result.output_dir}")
    return 0
