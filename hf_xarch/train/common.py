"""What the recipes share: the config sections every recipe has, the Accelerator, optimizer and LR schedule, the
tokenizer choice, and the final save (model, tokenizer, card, logs, plot, optional push).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import yaml

from .checkpoint import latest_valid_checkpoint
from .loop import LoopSettings
from .tokenizer import load_tokenizer, train_tokenizer

MIXED_PRECISION = ("no", "bf16", "fp16")

# sections shared by all recipes; each recipe copies these and adds its own keys
COMMON_SECTIONS = {
    "seed": 0,
    "output_dir": "runs/recipe",
    "tokenizer": {
        "path": None,  # a saved tokenizer (folder or tokenizer.json); null: train one on the training text
        "algorithm": "bpe",  # bpe | unigram | wordpiece
        "vocab_size": 4096,
        "min_frequency": 2,
        "train_bytes": 4_000_000,  # train it on at most this much text
    },
    "optimizer": {
        "name": "adamw",  # adamw | sgd
        "lr": 1.0e-3,
        "weight_decay": 0.01,  # not applied to biases, norms and other 1-D parameters
        "betas": [0.9, 0.95],
        "eps": 1.0e-8,
        "momentum": 0.9,  # sgd only
    },
    "schedule": {
        "name": "cosine",  # any transformers.get_scheduler name: linear, cosine, constant_with_warmup, ...
        "warmup_steps": 10,
    },
    "training": {
        "max_steps": 100,
        "micro_batch_size": 8,  # rows per process per forward
        "gradient_accumulation_steps": 1,  # global batch = micro_batch_size x this x processes
        "max_grad_norm": 1.0,  # 0 or null: no clipping
        "mixed_precision": "no",  # no | bf16 | fp16 (fp16 needs a GPU)
    },
    "evaluation": {
        "every_steps": 50,  # and always after the last step; 0: only then
        "batch_size": 16,
        # evaluations during training: a seeded random sample of this many batches (in total over all processes),
        # the same rows every time; 0 or null: the whole held-out set
        "max_batches": 20,
        "final_max_batches": 0,  # the final (reported) evaluation, likewise; 0 or null: the whole held-out set
    },
    "checkpoint": {
        "every_steps": 50,  # 0: no checkpoints
        "keep_last": 2,
        "resume": "auto",  # auto (the newest valid checkpoint in output_dir/checkpoints) | never | a checkpoint folder
    },
    "logging": {
        "every_steps": 10,
        "jsonl": True,
        "tensorboard": True,
        "plot": True,
        "progress_bar": True,
    },
    "hub": {
        "push": False,
        "repo_id": None,
        "private": True,
        "license": "apache-2.0",
    },
}


# the model config is first built before the tokenizer exists: a stand-in vocabulary this large passes the checks that
# grow with the vocabulary (adaptive cutoffs); the real model config is checked again once the tokenizer is known
STAND_IN_VOCAB_SIZE = 1 << 20


def check_model_section(fields, key: str = "model", **fixed) -> None:
    """Build an ``XArchConfig`` from a recipe's model section (plus `fixed` fields), so that a bad value fails before
    any text is read or a tokenizer trained. The error names the section."""
    from ..model.configuration_xarch import XArchConfig

    values = {"vocab_size": STAND_IN_VOCAB_SIZE, **dict(fields), **fixed}
    try:
        XArchConfig(**values)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from error


def check_saved_model(path, key: str = "base_model") -> None:
    """A folder written by ``save_pretrained``: it exists and holds a config.json."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{key}={str(path)!r}: no such folder (a save_pretrained output)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{key}={str(path)!r} holds no config.json: it is not a save_pretrained output")


def check_common(cfg) -> None:
    """Checks that need no data or model, so a bad config fails before anything loads."""
    if cfg.training.mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"training.mixed_precision={cfg.training.mixed_precision!r} is not allowed: one of {list(MIXED_PRECISION)}"
        )
    if cfg.training.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("training.mixed_precision='fp16' needs a GPU; on CPU use 'bf16' or 'no'")
    if cfg.optimizer.name not in ("adamw", "sgd"):
        raise ValueError(f"optimizer.name={cfg.optimizer.name!r} is not allowed: one of ['adamw', 'sgd']")
    if not cfg.optimizer.lr > 0:
        raise ValueError(f"optimizer.lr={cfg.optimizer.lr} is not allowed: a positive number")
    if cfg.hub.push and not cfg.hub.repo_id:
        raise ValueError("hub.push=true needs hub.repo_id (e.g. your-name/my-xarch-model)")
    hub = _hub_module() if cfg.hub.push else None
    if hub is not None:
        hub.check_hub_access()  # logged in and the Hub reachable: fail now, not after training
    if cfg.schedule.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} is not allowed: >= 0")
    from transformers.trainer_utils import SchedulerType

    names = [kind.value for kind in SchedulerType]
    if cfg.schedule.name not in names:
        raise ValueError(f"schedule.name={cfg.schedule.name!r} is not allowed: one of {names}")
    loop_settings(cfg, Path(cfg.output_dir))  # validates the loop knobs


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import set_seed

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != cfg.training.mixed_precision:
        # Accelerate keeps one state per process and refuses a second precision; a single process (a notebook,
        # two recipes in a row) may switch by resetting it, a distributed launch fixes it for the whole run
        if PartialState().num_processes > 1:
            raise ValueError(
                f"training.mixed_precision={cfg.training.mixed_precision!r}: this distributed run was started with "
                f"{state.get('_mixed_precision')!r}; pass it to `accelerate launch --mixed_precision` instead"
            )
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision)
    set_seed(cfg.seed)  # the same on every process: identical initial weights without a broadcast
    return accelerator


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW (or SGD) with weight decay only on matrices: decaying biases and norm gains hurts (GPT-2/nanoGPT)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": cfg.optimizer.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum)
    betas = tuple(cfg.optimizer.betas)
    if len(betas) != 2:
        raise ValueError(f"optimizer.betas={list(betas)} is not allowed: two numbers")
    return torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=betas, eps=cfg.optimizer.eps)


def make_scheduler(optimizer, cfg):
    from transformers import get_scheduler

    return get_scheduler(
        cfg.schedule.name,
        optimizer,
        num_warmup_steps=cfg.schedule.warmup_steps,
        num_training_steps=cfg.training.max_steps,
    )


def loop_settings(cfg, output_dir: Path, description: str = "training") -> LoopSettings:
    return LoopSettings(
        max_steps=cfg.training.max_steps,
        micro_batch_size=cfg.training.micro_batch_size,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        max_grad_norm=cfg.training.max_grad_norm or None,
        log_every=cfg.logging.every_steps,
        eval_every=cfg.evaluation.every_steps,
        checkpoint_every=cfg.checkpoint.every_steps,
        keep_last=cfg.checkpoint.keep_last,
        checkpoint_dir=output_dir / "checkpoints",
        resume=cfg.checkpoint.resume,
        progress_bar=cfg.logging.progress_bar,
        description=description,
    )


def will_resume(cfg, output_dir: Path) -> bool:
    if cfg.checkpoint.resume == "never":
        return False
    if cfg.checkpoint.resume != "auto":
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loop warns about skipped checkpoints when it really looks
        return latest_valid_checkpoint(output_dir / "checkpoints") is not None


def get_tokenizer(cfg, texts, output_dir: Path, causal: bool, accelerator):
    """The tokenizer: ``tokenizer.path`` if set; when resuming, the one the interrupted run saved (a retrained one
    could differ); else one trained on the training text, saved into `output_dir` at once."""
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path, key="tokenizer.path")
    if will_resume(cfg, output_dir) and (output_dir / "tokenizer.json").is_file():
        return load_tokenizer(output_dir)
    tokenizer = train_tokenizer(
        texts(),
        vocab_size=cfg.tokenizer.vocab_size,
        algorithm=cfg.tokenizer.algorithm,
        min_frequency=cfg.tokenizer.min_frequency,
        causal=causal,
        max_bytes=cfg.tokenizer.train_bytes,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(output_dir))
    return tokenizer


def check_length(block_size: int, model_config, key: str = "data.block_size") -> None:
    """Sequences longer than a bounded position table (learned positions) cannot run: fail now, not mid-training."""
    from ..model.registry import POSITION_SCHEMES

    limit = model_config.max_position_embeddings
    if block_size > limit:
        if POSITION_SCHEMES[model_config.position_embedding_type].bounded:
            raise ValueError(
                f"{key}={block_size} is longer than the model allows: position_embedding_type="
                f"{model_config.position_embedding_type!r} holds max_position_embeddings={limit} positions"
            )
        warnings.warn(
            f"{key}={block_size} exceeds model max_position_embeddings={limit}; "
            f"{model_config.position_embedding_type!r} positions run past it untrained"
        )


def save_outputs(
    accelerator,
    model,
    tokenizer,
    cfg,
    output_dir: Path,
    history: list[dict],
    eval_results: list[dict] | None = None,
    datasets: str | None = None,
    base_model: str | None = None,
    training_summary: str | None = None,
    plot_title: str = "training loss",
    state_dict: dict | None = None,
) -> dict:
    """Final save on the main process: the resolved config, tokenizer, model (``save_pretrained``), card, loss
    plot and eval results; then ``push_to_hub`` if asked. Returns {what: path}."""
    from .tracking import plot_losses

    written: dict = {}
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return written
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "recipe_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    written["config"] = output_dir / "recipe_config.yaml"
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output_dir))  # before the model, so the card knows there is a tokenizer
        written["tokenizer"] = output_dir / "tokenizer.json"
    card_kwargs = {
        "training_config": cfg.to_dict(),
        "eval_results": eval_results or None,
        "datasets": datasets,
        "base_model": base_model,
        "training_summary": training_summary,
        "license": cfg.hub.license,
    }
    hub = _hub_module()
    if hub is not None and hasattr(hub, "set_card_info"):
        hub.set_card_info(model, **card_kwargs)
    if state_dict is not None and _sharded(accelerator):
        model.save_pretrained(str(output_dir), state_dict=state_dict)  # gathered from the shards by the loop
    else:
        model.save_pretrained(str(output_dir))
    written["model"] = output_dir
    if hub is not None:
        try:
            hub.write_card(model, output_dir, overwrite=True, **card_kwargs)
        except Exception as err:  # noqa: BLE001  (a card problem must not lose a finished training run)
            warnings.warn(f"could not write the model card: {err}")
    if (output_dir / "README.md").is_file():
        written["card"] = output_dir / "README.md"
    if eval_results:
        (output_dir / "eval_results.json").write_text(json.dumps(eval_results, indent=1))
        written["eval_results"] = output_dir / "eval_results.json"
    if cfg.logging.plot:
        plot = plot_losses(history, output_dir / "loss.png", title=plot_title)
        if plot is not None:
            written["plot"] = plot
    if cfg.hub.push:
        if hub is not None and hasattr(hub, "push_folder"):
            hub.push_folder(output_dir, cfg.hub.repo_id, private=cfg.hub.private)
        else:
            model.push_to_hub(cfg.hub.repo_id, private=cfg.hub.private)
            if tokenizer is not None:
                tokenizer.push_to_hub(cfg.hub.repo_id, private=cfg.hub.private)
        written["hub"] = cfg.hub.repo_id
    return written


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _hub_module():
    """hf_xarch.hub when it is importable (model cards); the recipes work without it."""
    try:
        from .. import hub
    except ImportError:
        return None
    return hub if hasattr(hub, "write_card") else None


def eval_result_entries(metrics: dict, task_type: str, dataset_name: str) -> list[dict]:
    """``model-index`` entries (huggingface_hub ``EvalResult`` fields) for the card and ``eval_results.json``, from
    ``eval/...`` metrics; each carries what was scored (``dataset_args``: the coverage sentence and counts)."""
    from .evaluation import COVERAGE_KEYS

    coverage = {key.split("/", 1)[-1]: metrics[key] for key in COVERAGE_KEYS if key in metrics}
    entries = []
    for key, value in metrics.items():
        name = key.split("/", 1)[-1]
        if key in COVERAGE_KEYS or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        entry = {
            "task_type": task_type,
            "dataset_type": "custom",
            "dataset_name": dataset_name,
            "dataset_split": "held-out",
            "metric_type": name,
            "metric_value": round(float(value), 6),
        }
        if coverage:
            entry["dataset_args"] = dict(coverage)
        entries.append(entry)
    return entries
