"""Linearize a softmax LM (LoLCATs, Zhang et al. 2024): every attention layer becomes linear attention with a learned
feature map (``linear``) or its hybrid with a softmax sliding window (``linear_sliding``), keeping the q/k/v/o
weights; attention transfer trains only the feature maps to match each softmax layer's output; LoRA (PEFT) then
fine-tunes on the model's own objective. A before/after table reports held-out loss and bits per byte, and each
layer's attention-output error before and after transfer.

    accelerate launch recipes/linearize.py --config recipes/configs/linearize.yaml base_model=runs/pretrain_clm
    hf-xarch linearize attention_type=linear feature_map=t2r transfer.max_steps=300

The recipe: load the base model (or, without ``base_model``, pretrain a small causal one here first, from the ``base``
section) -> ``hf_xarch.linearize`` -> attention transfer (``hf_xarch.linearize.AttentionTransfer`` in the shared loop:
its own checkpoints in ``output_dir/transfer``) -> LoRA fine-tuning in the shared loop (``output_dir/checkpoints``)
-> merge the adapters -> save the model (its card says what it was linearized from), the table
(``linearize.md/.json``). A rerun after a kill resumes each stage from its newest checkpoint, exactly.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from .common import (
    COMMON_SECTIONS,
    check_common,
    check_saved_model,
    eval_result_entries,
    loop_settings,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    save_outputs,
)
from .config import Config, parse_args, xarch_config_fields
from .data import ExampleOrder, load_records, pack_blocks
from .evaluation import evaluate_lm
from .extend_context import train_base
from .pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from .pretrain import make_lm_collate
from .tokenizer import check_tokenizer_folder, load_tokenizer
from .tracking import MetricsLogger

DEFAULTS = {
    **copy.deepcopy(COMMON_SECTIONS),
    "output_dir": "runs/linearize",
    "base_model": None,  # a saved softmax XArch LM (causal or masked) with its tokenizer; null: pretrain one (`base`)
    "base": {  # only without base_model: a short causal pretraining run, saved in output_dir/base
        "max_steps": 200,
        "block_size": 64,
        "model": copy.deepcopy(PRETRAIN_DEFAULTS["model"]),
    },
    "attention_type": "linear_sliding",  # linear | linear_sliding
    "feature_map": "hedgehog",  # a learned map (hedgehog | t2r): attention transfer trains it
    "feature_dim": None,  # null: the map's default (head_dim)
    "window": 64,  # linear_sliding: keys each query attends to with exact softmax
    "data": {**copy.deepcopy(PRETRAIN_DEFAULTS["data"]), "heldout_fraction": 0.1, "block_size": 64},
    "mlm_probability": 0.15,
    "transfer": {  # stage 1: feature maps (and window mixes) only, layer by layer against the softmax outputs
        "max_steps": 100,
        "lr": 1.0e-2,
    },
    "lora": {  # stage 2, `training` steps on the LM objective; enabled=false fine-tunes every weight instead
        "enabled": True,
        "r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": None,  # null: q_proj k_proj v_proj o_proj
    },
    "error_batches": 4,  # held-out batches (evaluation.batch_size rows) the per-layer errors are measured on
}
DEFAULTS["training"] = {**DEFAULTS["training"], "max_steps": 100, "micro_batch_size": 8}
DEFAULTS["optimizer"] = {**DEFAULTS["optimizer"], "lr": 1.0e-3}
DEFAULTS["base"]["model"]["max_position_embeddings"] = 64
OPEN_SECTIONS = {"base.model": xarch_config_fields()}

ROWS = ("teacher (softmax)", "linearized, no training", "after attention transfer", "after transfer + fine-tuning")


@dataclass
class LinearizeResult:
    output_dir: Path
    table: dict  # row -> eval metrics
    errors: dict  # "before transfer" / "after transfer" -> per-layer relative errors
    written: dict
    model: object


def check_config(cfg) -> None:
    check_common(cfg)
    from hf_xarch.linearize import LINEAR_FAMILIES

    if cfg.attention_type not in LINEAR_FAMILIES:
        raise ValueError(f"attention_type={cfg.attention_type!r} is not allowed: one of {list(LINEAR_FAMILIES)}")
    for key in ("max_steps",):
        value = cfg.transfer[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"transfer.{key}={value!r} is not allowed: a positive integer")
    if not (isinstance(cfg.transfer.lr, (int, float)) and cfg.transfer.lr > 0):
        raise ValueError(f"transfer.lr={cfg.transfer.lr!r} is not allowed: a positive number")
    if cfg.lora.enabled and (isinstance(cfg.lora.r, bool) or not isinstance(cfg.lora.r, int) or cfg.lora.r < 1):
        raise ValueError(f"lora.r={cfg.lora.r!r} is not allowed: a positive integer")
    if cfg.base_model:
        check_saved_model(cfg.base_model)
        if not cfg.tokenizer.path:
            check_tokenizer_folder(cfg.base_model, key="base_model")


def base_folder(cfg) -> Path:
    """The model to linearize: ``base_model``, or the base this recipe pretrained (once: a rerun reuses it)."""
    if cfg.base_model:
        return Path(cfg.base_model)
    saved = Path(cfg.output_dir) / "base"
    return saved if (saved / "config.json").is_file() else train_base(cfg)


def add_lora(model, cfg):
    """LoRA adapters (Hu et al. 2021) on the attention projections; everything else, feature maps included, frozen."""
    from peft import LoraConfig, get_peft_model

    from hf_xarch import PEFT_TARGET_MODULES

    config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=list(cfg.lora.target_modules or PEFT_TARGET_MODULES))
    return get_peft_model(model, config)


def run_linearize(cfg: Config, callbacks=()) -> LinearizeResult:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, get_scheduler

    from hf_xarch.linearize import AttentionTransfer, attention_errors, linearize, transfer_parameters

    from .loop import LoopSettings, train

    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    base_path = base_folder(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer.path or base_path,
                               key="tokenizer.path" if cfg.tokenizer.path else "base_model")
    causal = bool(AutoConfig.from_pretrained(str(base_path)).is_decoder)
    task = "clm" if causal else "mlm"
    teacher = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_pretrained(str(base_path)).eval()
    student = linearize(teacher, attention_type=cfg.attention_type, feature_map=cfg.feature_map,
                        feature_dim=cfg.feature_dim, window=cfg.window)
    student.config.linearized_from = str(base_path)

    records = load_records(cfg.data, cfg.seed)
    column = cfg.data.text_column
    train_blocks, _ = pack_blocks([r[column] for r in records.train], tokenizer, cfg.data.block_size, causal)
    heldout_blocks, counts = pack_blocks([r[column] for r in records.heldout], tokenizer, cfg.data.block_size, causal)
    if len(train_blocks) == 0 or len(heldout_blocks) == 0:
        raise ValueError(f"the text gives {len(train_blocks)} training and {len(heldout_blocks)} held-out blocks of "
                         f"data.block_size={cfg.data.block_size}; raise data.max_bytes or lower the block size")
    bytes_per_token = counts["bytes"] / counts["tokens"]

    def evaluate(model, max_batches=cfg.evaluation.max_batches):
        return evaluate_lm(accelerator, model, heldout_blocks, cfg.evaluation.batch_size, task=task,
                           tokenizer=tokenizer, mlm_probability=cfg.mlm_probability,
                           bytes_per_token=bytes_per_token if causal else None, max_batches=max_batches or None,
                           sample_seed=cfg.seed)

    batch = cfg.evaluation.batch_size
    error_batches = [{"input_ids": heldout_blocks[i : i + batch]}
                     for i in range(0, min(len(heldout_blocks), batch * cfg.error_batches), batch)]
    table = {ROWS[0]: evaluate(teacher, cfg.evaluation.final_max_batches),
             ROWS[1]: evaluate(student, cfg.evaluation.final_max_batches)}
    errors = {"before transfer": attention_errors(student, teacher, error_batches)}
    order = ExampleOrder(examples=train_blocks, seed=cfg.seed)
    collate = make_lm_collate(task, tokenizer, cfg.mlm_probability, cfg.seed)

    # stage 1: attention transfer, in the shared loop (checkpoints, exact resume)
    objective = AttentionTransfer(student, teacher)
    optimizer = torch.optim.AdamW(transfer_parameters(student), lr=cfg.transfer.lr, weight_decay=0.0)
    scheduler = get_scheduler(cfg.schedule.name, optimizer, num_warmup_steps=cfg.schedule.warmup_steps,
                              num_training_steps=cfg.transfer.max_steps)
    settings = loop_settings(cfg, output_dir / "transfer", description="linearize: attention transfer")
    settings = LoopSettings(**{**settings.__dict__, "max_steps": cfg.transfer.max_steps, "eval_every": None})
    logger = MetricsLogger(output_dir / "transfer" / "logs", enabled=accelerator.is_main_process,
                           tensorboard=False, jsonl=cfg.logging.jsonl)
    transferred = train(accelerator, objective, optimizer, scheduler, order, collate, settings, causal=causal,
                        logger=logger, callbacks=callbacks)
    logger.close()
    student = transferred.model.student.train(False)
    errors["after transfer"] = attention_errors(student, teacher, error_batches)
    table[ROWS[2]] = evaluate(student, cfg.evaluation.final_max_batches)
    del objective, teacher

    # stage 2: LoRA (or full) fine-tuning on the LM objective; the feature maps stay as transfer left them
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    model = add_lora(student, cfg) if cfg.lora.enabled else student
    optimizer = make_optimizer(model, cfg)
    logger = MetricsLogger(output_dir / "logs", enabled=accelerator.is_main_process,
                           tensorboard=cfg.logging.tensorboard, jsonl=cfg.logging.jsonl)
    finetuned = train(accelerator, model, optimizer, make_scheduler(optimizer, cfg), order, collate,
                      loop_settings(cfg, output_dir, description="linearize: LoRA" if cfg.lora.enabled else
                                    "linearize: fine-tuning"),
                      causal=causal, evaluate=evaluate, logger=logger, callbacks=callbacks)
    logger.close()
    trained = finetuned.model
    if cfg.lora.enabled:
        trained = trained.merge_and_unload()  # a plain model that loads with AutoModel* (and trust_remote_code)
    trained.eval()
    table[ROWS[3]] = evaluate(trained, cfg.evaluation.final_max_batches)

    stages = (f"every layer replaced by {cfg.attention_type} attention ({cfg.feature_map} feature map"
              + (f", softmax window {cfg.window}" if cfg.attention_type == "linear_sliding" else "") + ") keeping its "
              f"q/k/v/o weights; {cfg.transfer.max_steps} steps of attention transfer (feature maps only, layer-wise "
              f"MSE against the softmax layers); {finetuned.step} steps of "
              f"{'LoRA r=' + str(cfg.lora.r) if cfg.lora.enabled else 'full'} fine-tuning on {records.description}")
    written = save_outputs(
        accelerator, trained, tokenizer, cfg, output_dir, finetuned.history,
        eval_results=eval_result_entries(table[ROWS[3]], "text-generation" if causal else "fill-mask",
                                         "held-out text"),
        base_model=str(base_path),
        training_summary=f"Linearized from {base_path} (LoLCATs-style): {stages}.",
        plot_title="linearize: fine-tuning",
        state_dict=None,
    )
    if accelerator.is_main_process:
        written.update(write_report(output_dir, table, errors, cfg, str(base_path)))
        print(format_table(table, errors, cfg, str(base_path)))
    accelerator.wait_for_everyone()
    return LinearizeResult(output_dir, table, errors, written, trained)


def format_table(table: dict, errors: dict, cfg, base: str) -> str:
    keys = [k for k in ("eval/loss", "eval/bits_per_byte") if all(k in row for row in table.values())]
    lines = [f"Linearized {base} to {cfg.attention_type} ({cfg.feature_map}); held-out text.", "",
             "| model | " + " | ".join(k.split("/")[1] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {row} | " + " | ".join(f"{metrics[k]:.4f}" for k in keys) + " |" for row, metrics in table.items()]
    lines += ["", "Relative attention-output error per layer, ||linear - softmax|| / ||softmax||:", "",
              "| layer | " + " | ".join(errors) + " |", "|---|" + "---|" * len(errors)]
    layers = len(next(iter(errors.values())))
    lines += [f"| {i} | " + " | ".join(f"{values[i]:.3f}" for values in errors.values()) + " |" for i in range(layers)]
    return "\n".join(lines)


def write_report(output_dir: Path, table: dict, errors: dict, cfg, base: str) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = output_dir / "linearize.md"
    markdown.write_text(format_table(table, errors, cfg, base) + "\n")
    data = output_dir / "linearize.json"
    data.write_text(json.dumps({"base_model": base, "attention_type": cfg.attention_type,
                                "feature_map": cfg.feature_map, "table": table, "layer_errors": errors}, indent=1))
    return {"table": markdown, "table_json": data}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, DEFAULTS, __doc__, open_sections=OPEN_SECTIONS)
    if cfg is None:
        return 0
    run_linearize(cfg)
    return 0
