"""Extend the context of a RoPE causal LM trained at length L to factor x L, fine-tune it there, and report
perplexity at every evaluation length from L to factor x L: the base model as it is (plain extrapolation), the
extended model before fine-tuning, and after.

    accelerate launch recipes/extend_context.py --config recipes/configs/extend_context.yaml base_model=runs/pretrain
    hf-xarch extend-context factor=4 rope_type=yarn

The recipe: load the base model (or, without ``base_model``, pretrain a small one here first, from the ``base``
section) -> measure -> ``hf_xarch.extend_context(model, factor, rope_type, **rope_kwargs)`` (position interpolation,
Chen et al. 2023, by default; any rope type transformers knows) -> measure -> fine-tune on blocks of factor x L tokens
with the pretraining loop -> measure -> save the model, the table (``context_extension.md/.json``) and its plot.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from .common import COMMON_SECTIONS, check_common, check_model_section, check_saved_model, make_accelerator
from .config import Config, load_config, merge, parse_args, xarch_config_fields
from .data import load_records, pack_blocks
from .evaluation import evaluate_lm, sample_rows
from .pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from .pretrain import TRAINED_LENGTH_FIELD, run_pretrain
from .tokenizer import check_tokenizer_folder

DEFAULTS = {
    **copy.deepcopy(COMMON_SECTIONS),
    "output_dir": "runs/extend_context",
    "base_model": None,  # a saved RoPE causal LM (folder with its tokenizer); null: pretrain one first (`base`)
    "base": {  # only without base_model: a short pretraining run at length block_size, saved in output_dir/base
        "max_steps": 200,
        "block_size": 64,
        "model": copy.deepcopy(PRETRAIN_DEFAULTS["model"]),
    },
    "factor": 4.0,  # the new context is factor x L, the length the base model was trained at (see trained_length)
    "rope_type": "linear",  # linear (position interpolation) | dynamic | yarn | longrope | llama3 | ...
    "rope_kwargs": {},  # extra rope_parameters for that type (e.g. beta_fast for yarn)
    "data": {
        **copy.deepcopy(PRETRAIN_DEFAULTS["data"]),
        "heldout_fraction": 0.1,
        "block_size": 0,  # fine-tuning block; 0: factor x L
    },
    "lengths": [],  # evaluation lengths; empty: L, 2L, 4L, ... up to factor x L
    "eval_tokens_per_length": 16384,  # held-out tokens scored at each length (a seeded random sample of blocks)
}
DEFAULTS["training"] = {**DEFAULTS["training"], "max_steps": 100, "micro_batch_size": 4}
DEFAULTS["optimizer"] = {**DEFAULTS["optimizer"], "lr": 3.0e-4}
DEFAULTS["schedule"] = {**DEFAULTS["schedule"], "warmup_steps": 5}
DEFAULTS["base"]["model"]["max_position_embeddings"] = 64
OPEN_SECTIONS = {"base.model": xarch_config_fields(), "rope_kwargs": None}

COLUMNS = ("base (plain extrapolation)", "extended, before fine-tuning", "extended, after fine-tuning")


@dataclass
class ExtensionResult:
    output_dir: Path
    base_length: int
    new_length: int
    table: dict  # length -> {column: perplexity}
    written: dict
    scored: dict | None = None  # length -> {"blocks": scored, "heldout_blocks": all of that length}


def evaluation_lengths(base_length: int, factor: float, given: list[int]) -> list[int]:
    """The lengths to score: `given`, or L, 2L, 4L, ... and factor x L."""
    new_length = math.ceil(base_length * factor)
    if given:
        bad = [n for n in given if not isinstance(n, int) or n < 2]
        if bad:
            raise ValueError(f"lengths={given} is not allowed: integers >= 2 (got {bad})")
        return sorted(set(given))
    lengths, length = [], base_length
    while length < new_length:
        lengths.append(length)
        length *= 2
    return lengths + [new_length]


def perplexities(accelerator, model, blocks_by_length: dict, batch_size: int) -> dict:
    """Perplexity of `model` on each length's held-out blocks (every position of every block counts)."""
    result = {}
    for length, blocks in blocks_by_length.items():
        rows = max(1, min(batch_size, 4096 // length))
        result[length] = evaluate_lm(accelerator, model, blocks, rows, task="clm")["eval/perplexity"]
    return result


def _pretrain_config(values: dict) -> Config:
    """A pretrain recipe config: its defaults with `values` merged in (the same key checks as the command line)."""
    return load_config(merge(PRETRAIN_DEFAULTS, values, {"model": xarch_config_fields()}))


def _shared_sections(cfg) -> dict:
    return {key: cfg[key].to_dict() for key in ("tokenizer", "optimizer", "schedule", "evaluation", "logging", "hub")}


def train_base(cfg) -> Path:
    """Pretrain the base model the recipe extends, when none is given: `base.max_steps` steps at `base.block_size`."""
    data = {**cfg.data.to_dict(), "block_size": cfg.base.block_size}
    model = {**cfg.base.model.to_dict(), "max_position_embeddings": cfg.base.block_size}
    values = {
        **_shared_sections(cfg),
        "seed": cfg.seed,
        "task": "clm",
        "output_dir": str(Path(cfg.output_dir) / "base"),
        "model": model,
        "data": data,
        "training": {**cfg.training.to_dict(), "max_steps": cfg.base.max_steps},
        "checkpoint": {**cfg.checkpoint.to_dict(), "every_steps": 0},
        "hub": {**cfg.hub.to_dict(), "push": False},
    }
    return run_pretrain(_pretrain_config(values)).output_dir


def trained_length(config, folder) -> int:
    """The length L the base model was trained at: the ``trained_sequence_length`` the recipes record in the saved
    config (a model trained on 128-token blocks may have max_position_embeddings=256); for a model trained elsewhere,
    its max_position_embeddings, with a warning that says so."""
    recorded = getattr(config, TRAINED_LENGTH_FIELD, None)
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 2:
        return recorded
    warnings.warn(
        f"base_model={str(folder)!r}: its config.json records no {TRAINED_LENGTH_FIELD} (the hf_xarch recipes write "
        f"it); taking max_position_embeddings={config.max_position_embeddings} as the length it was trained at"
    )
    return config.max_position_embeddings


def check_config(cfg) -> None:
    check_common(cfg)
    if not (isinstance(cfg.factor, (int, float)) and cfg.factor > 1.0):
        raise ValueError(f"factor={cfg.factor!r} is not allowed: a number > 1 (the new length is factor x L)")
    if cfg.base_model:
        check_saved_model(cfg.base_model)
        if not cfg.tokenizer.path:
            check_tokenizer_folder(cfg.base_model, key="base_model")
    else:
        check_model_section(cfg.base.model, key="base.model", is_decoder=True)


def run_extend_context(cfg: Config, callbacks=()) -> ExtensionResult:
    import torch
    from transformers import AutoModelForCausalLM

    from .. import extend_context
    from .tokenizer import load_tokenizer

    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    base_path = Path(cfg.base_model) if cfg.base_model else train_base(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer_key = "tokenizer.path" if cfg.tokenizer.path else "base_model"
    tokenizer = load_tokenizer(cfg.tokenizer.path or base_path, key=tokenizer_key)
    base = AutoModelForCausalLM.from_pretrained(str(base_path))
    base_length = trained_length(base.config, base_path)
    new_length = math.ceil(base_length * cfg.factor)
    # extend a copy first: a model whose positions cannot be extended (learned) fails here, before any work
    # (with rope_type="dynamic" max_position_embeddings stays L: transformers' dynamic NTK reads it as the length
    # beyond which it rescales, so the new length is only ours to track)
    extended = extend_context(copy.deepcopy(base), cfg.factor, rope_type=cfg.rope_type, **cfg.rope_kwargs.to_dict())

    lengths = evaluation_lengths(base_length, cfg.factor, list(cfg.lengths))
    records = load_records(cfg.data, cfg.seed)
    heldout = [r[cfg.data.text_column] for r in records.heldout]
    blocks_by_length, scored = {}, {}
    for length in lengths:
        blocks, counts = pack_blocks(heldout, tokenizer, length, causal=True)
        if len(blocks) == 0:
            raise ValueError(
                f"the held-out text ({counts['tokens']} tokens) is shorter than the evaluation length {length}; "
                "raise data.heldout_fraction or data.max_bytes"
            )
        # a random sample, not the first blocks: those are the first documents, not a sample of the held-out text
        chosen = sample_rows(len(blocks), max(1, math.ceil(cfg.eval_tokens_per_length / length)), cfg.seed)
        blocks_by_length[length] = blocks if chosen is None else blocks[chosen]
        scored[length] = {"blocks": len(blocks_by_length[length]), "heldout_blocks": len(blocks)}
    batch = cfg.evaluation.batch_size
    table = {n: {} for n in lengths}
    for column, model in ((COLUMNS[0], base), (COLUMNS[1], extended)):
        for length, value in perplexities(accelerator, model, blocks_by_length, batch).items():
            table[length][column] = value
    del base

    block_size = cfg.data.block_size or new_length
    values = {
        **_shared_sections(cfg),
        "seed": cfg.seed,
        "task": "clm",
        "output_dir": str(output_dir),
        "model": {},
        "data": {**cfg.data.to_dict(), "block_size": block_size},
        "training": cfg.training.to_dict(),
        "checkpoint": cfg.checkpoint.to_dict(),
    }
    pretrain_cfg = _pretrain_config(values)
    finetuned = run_pretrain(pretrain_cfg, callbacks=callbacks, model=extended, tokenizer=tokenizer,
                             base_model=str(base_path))
    model = finetuned.loop.model
    for length, value in perplexities(accelerator, model, blocks_by_length, batch).items():
        table[length][COLUMNS[2]] = value

    written = dict(finetuned.written)
    if accelerator.is_main_process:
        written.update(write_report(output_dir, table, base_length, new_length, cfg, scored))
        print(format_table(table, base_length, new_length, cfg, scored))
    accelerator.wait_for_everyone()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return ExtensionResult(output_dir, base_length, new_length, table, written, scored)


def format_table(table: dict, base_length: int, new_length: int, cfg, scored: dict | None = None) -> str:
    """The perplexity table; with `scored`, a column saying how many held-out blocks each length scored (a seeded
    random sample when fewer than all)."""
    lines = [
        (f"Perplexity on held-out text; base trained at L={base_length}, extended x{cfg.factor:g} to {new_length} "
        f"with rope_type={cfg.rope_type!r}, fine-tuned {cfg.training.max_steps} steps."
        + (f" Blocks scored: a uniform random sample (seed {cfg.seed}) of the held-out blocks of each length, or all "
           "of them." if scored else "")),
        "",
        "| length | " + " | ".join(COLUMNS) + (" | blocks scored |" if scored else " |"),
        "|---|" + "---|" * (len(COLUMNS) + bool(scored)),
    ]
    for length, row in table.items():
        cells = [f"{row.get(c, float('nan')):.2f}" for c in COLUMNS]
        if scored:
            cells.append(f"{scored[length]['blocks']} of {scored[length]['heldout_blocks']}")
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(output_dir: Path, table: dict, base_length: int, new_length: int, cfg,
                 scored: dict | None = None) -> dict:
    """The table as Markdown and JSON, and perplexity against length as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = output_dir / "context_extension.md"
    markdown.write_text(format_table(table, base_length, new_length, cfg, scored) + "\n")
    data = output_dir / "context_extension.json"
    data.write_text(json.dumps({"base_length": base_length, "new_length": new_length, "factor": cfg.factor,
                                "rope_type": cfg.rope_type, "perplexity": {str(k): v for k, v in table.items()},
                                "scored": {str(k): v for k, v in (scored or {}).items()}, "sample_seed": cfg.seed},
                               indent=1))
    figure, axes = plt.subplots(figsize=(6, 4), dpi=110)
    lengths = list(table)
    for column in COLUMNS:
        axes.plot(lengths, [table[n].get(column, float("nan")) for n in lengths], marker="o", label=column)
    axes.axvline(base_length, color="grey", linestyle=":", label=f"trained length {base_length}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("evaluation length (tokens)")
    axes.set_ylabel("perplexity")
    axes.set_title(f"context extension x{cfg.factor:g} ({cfg.rope_type})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    plot = output_dir / "context_extension.png"
    figure.savefig(plot)
    plt.close(figure)
    return {"table": markdown, "table_json": data, "extension_plot": plot}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, DEFAULTS, __doc__, open_sections=OPEN_SECTIONS)
    if cfg is None:
        return 0
    run_extend_context(cfg)
    return 0
