"""`hf-xarch compare`: train several named XArch configurations on the same data at equal compute and measure which
does best at what: held-out bits per byte at every evaluation length, training and decoding speed, memory, size.

    hf-xarch compare --config recipes/configs/compare.yaml
    hf-xarch compare --config recipes/configs/compare_positions.yaml budget.train_tokens=1000000
    accelerate launch recipes/compare.py --config recipes/configs/compare.yaml evaluation.lengths=[128,256,512,1024]
    hf-xarch compare --config recipes/configs/compare.yaml data.files=[my_corpus/] budget.train_flops=3e12

Steps (`run_compare`):
1. One tokenizer for every model, saved in OUTPUT/tokenizer: ``tokenizer.path``, bytes (``tokenizer.algorithm=byte``:
   256 byte tokens, no merges) or one trained on the training text.
2. Each entry of ``models`` (its XArchConfig fields over the shared ``model`` section) is trained by the pretrain
   recipe (`run_pretrain`) into OUTPUT/models/NAME with the same seed, so every model starts from the same random
   stream and sees the same batches in the same order. The budget is ``budget.train_tokens`` each, or
   ``budget.train_flops`` each, turned into tokens by ``hf_xarch.summary``'s training FLOPs per token at the training
   length (``data.block_size``); a model trains whole steps, the most that fit its budget.
3. Each trained model is measured (`measure`): bits per byte at every evaluation length (the whole held-out set, or
   a seeded random sample of ``evaluation.tokens_per_length`` tokens per length, as each figure's coverage says),
   forward speed and memory per length, the memory of one training step, decode speed and cache memory after the
   longest length, and parameters.
4. With ``extension.rope_types``, every RoPE model is extended with ``hf_xarch.extend_context`` (``linear``: position
   interpolation, ``yarn``, ...; ``none``: the same fine-tuning without rescaling) and fine-tuned on
   ``extension.train_tokens`` at ``extension.factor`` x the training length, then measured as NAME+TYPE.
5. `report` writes results.json (``models.NAME.bits_per_byte.LENGTH``), results.csv, report.md with its plots, and a
   summary that ranks the models per criterion from the numbers.

Resuming: a model whose measurements.json exists (for the same settings) is not trained again; a model interrupted
mid-training resumes from its last checkpoint (``checkpoint.every_steps``). Changing a setting that changes the
results (model fields, data, budget, evaluation...) under the same output_dir is refused, naming the model.

Budget on the command line: ``budget.train_tokens=N`` or ``budget.train_flops=F`` given there replaces the budget
the config file sets (the other key is cleared; of several, the last one given wins).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..train.common import COMMON_SECTIONS, check_model_section, make_accelerator
from ..train.config import Config, load_config, merge, parse_args, xarch_config_fields
from ..train.evaluation import format_scores
from ..train.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from ..train.pretrain import check_config as check_pretrain
from ..train.pretrain import run_pretrain
from ..train.tokenizer import ALGORITHMS, SPECIAL_TOKENS, load_tokenizer, train_tokenizer

BYTE_LEVEL = "byte"  # tokenizer.algorithm: byte-level BPE with no merges, one token per byte
BUDGET_KEYS = ("train_tokens", "train_flops")
NO_RESCALING = "none"  # extension.rope_types: fine-tune at the longer length with the RoPE as it is
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESULT_FILE = "measurements.json"

DEFAULTS = {
    **copy.deepcopy(COMMON_SECTIONS),
    "output_dir": "runs/compare",
    "model": copy.deepcopy(PRETRAIN_DEFAULTS["model"]),  # shared by every model; each entry of `models` overrides it
    "models": {},  # name -> XArchConfig fields over `model`
    "data": copy.deepcopy(PRETRAIN_DEFAULTS["data"]),  # data.block_size: the training length
    "budget": {
        "train_tokens": None,  # each model trains on this many tokens ...
        "train_flops": None,  # ... or on this many training FLOPs (hf_xarch.summary: 3 x forward per token)
    },
    "evaluation": {
        "lengths": [],  # empty: 1, 2, 4 and 8 x data.block_size
        "tokens_per_length": 16384,  # held-out tokens scored per length (a seeded random sample); 0: all of them
        "batch_size": 8,
    },
    "measure": {
        "decode_tokens": 32,  # greedy tokens decoded after the longest length (0: no decode measurement)
        "memory": True,  # peak memory of a training step and of a forward per length
    },
    "extension": {
        "rope_types": [],  # e.g. [linear, yarn, none]: extend every RoPE model (none: fine-tune without rescaling)
        "factor": 0.0,  # new length = factor x data.block_size; 0: the longest evaluation length
        "train_tokens": 50_000,  # fine-tuning tokens at the new length
        "warmup_steps": 0,  # the fine-tuning's warm-up (its schedule is `schedule.name` over its own steps)
        "rope_kwargs": {},  # rope_type -> its extra rope_parameters, e.g. {yarn: {beta_fast: 32}}
    },
}
DEFAULTS["training"] = {key: value for key, value in DEFAULTS["training"].items() if key != "max_steps"}
DEFAULTS["tokenizer"]["algorithm"] = "bpe"  # bpe | unigram | wordpiece | byte


class OpenSections(dict):
    """The config's open sections: ``models`` takes any name, each ``models.NAME`` the XArchConfig fields (so
    ``models.alibi.hidden_size=64`` works on the command line as ``model.hidden_size=64`` does)."""

    def __contains__(self, section) -> bool:
        return super().__contains__(section) or (section.startswith("models.") and section.count(".") == 1)

    def __getitem__(self, section):
        return super().__getitem__("model") if section.startswith("models.") else super().__getitem__(section)


def open_sections() -> OpenSections:
    return OpenSections({"model": xarch_config_fields(), "models": None, "extension.rope_kwargs": None})


def model_fields(cfg) -> dict[str, dict]:
    """Each model's XArchConfig fields: the shared ``model`` section, then its own entry."""
    return {name: {**cfg.model.to_dict(), **dict(fields or {})} for name, fields in cfg.models.items()}


def evaluation_lengths(cfg) -> list[int]:
    length = cfg.data.block_size
    return sorted(set(cfg.evaluation.lengths)) if cfg.evaluation.lengths else [length, 2 * length, 4 * length, 8 * length]


def extension_length(cfg) -> int:
    factor = cfg.extension.factor or max(evaluation_lengths(cfg)) / cfg.data.block_size
    return math.ceil(cfg.data.block_size * factor)


def _positive_int(value, key: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is not allowed: an integer >= {minimum}")


def _number(value, key: str) -> float:
    """A positive number; YAML 1.1 reads ``1e12`` as a string, so such strings are numbers too."""
    try:
        number = float(value) if isinstance(value, str) and not isinstance(value, bool) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{key}={value!r} is not allowed: a positive number")
    return number


def check_config(cfg) -> None:
    """Everything that needs no data: a bad value fails before any text is read or a tokenizer trained."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # the sections compare hands to the pretrain recipe (optimizer, schedule, training, checkpoint...) get its checks
    check_pretrain(pretrain_config(cfg, Path(cfg.output_dir), cfg.model.to_dict(), 1, cfg.data.block_size, Path(".")))
    if not isinstance(cfg.models, dict) or not cfg.models:
        raise ValueError("models is empty: name at least one configuration, e.g. models: {rope: {}, alibi: "
                         "{position_embedding_type: alibi}}")
    for name, fields in cfg.models.items():
        if not isinstance(name, str) or not MODEL_NAME.match(name):
            raise ValueError(f"models: the name {name!r} is not allowed: letters, digits, '_', '.', '-' (it names a "
                             "folder)")
        if fields is not None and not isinstance(fields, dict):
            raise ValueError(f"models.{name}={fields!r} is not allowed: a mapping of XArchConfig fields")
    for name, fields in model_fields(cfg).items():
        check_model_section(fields, key=f"models.{name}", is_decoder=True)
    _positive_int(cfg.data.block_size, "data.block_size", 2)
    for length in cfg.evaluation.lengths:
        _positive_int(length, "evaluation.lengths[]", 2)
    _positive_int(cfg.evaluation.batch_size, "evaluation.batch_size")
    _positive_int(cfg.evaluation.tokens_per_length, "evaluation.tokens_per_length", 0)
    _positive_int(cfg.measure.decode_tokens, "measure.decode_tokens", 0)
    given = {key: cfg.budget[key] for key in BUDGET_KEYS if cfg.budget[key] is not None}
    if len(given) != 1:
        raise ValueError(f"budget: give exactly one of budget.train_tokens or budget.train_flops (the other null); "
                         f"got {given or 'neither'}")
    (key, value), = given.items()
    cfg.budget[key] = _number(value, f"budget.{key}")
    algorithms = [*ALGORITHMS, BYTE_LEVEL]
    if not cfg.tokenizer.path and cfg.tokenizer.algorithm not in algorithms:
        raise ValueError(f"tokenizer.algorithm={cfg.tokenizer.algorithm!r} is not allowed: one of {algorithms}")
    allowed = sorted(set(ROPE_INIT_FUNCTIONS) - {"default"}) + [NO_RESCALING]
    for rope_type in cfg.extension.rope_types:
        if rope_type not in allowed:
            raise ValueError(f"extension.rope_types: {rope_type!r} is not allowed: one of {allowed}")
    for rope_type in cfg.extension.rope_kwargs:
        if rope_type not in cfg.extension.rope_types:
            raise ValueError(f"extension.rope_kwargs.{rope_type}: {rope_type!r} is not in extension.rope_types "
                             f"{list(cfg.extension.rope_types)}")
    if cfg.extension.rope_types:
        factor = cfg.extension.factor
        if not (factor == 0 or factor > 1):
            raise ValueError(f"extension.factor={factor!r} is not allowed: a number > 1, or 0 for the longest "
                             "evaluation length")
        if extension_length(cfg) <= cfg.data.block_size:
            raise ValueError(f"extension: the new length {extension_length(cfg)} is not longer than data.block_size="
                             f"{cfg.data.block_size}; raise extension.factor or the evaluation lengths")
        _positive_int(cfg.extension.train_tokens, "extension.train_tokens")
        _positive_int(cfg.extension.warmup_steps, "extension.warmup_steps", 0)
        if not any(fields.get("position_embedding_type") == "rope" for fields in model_fields(cfg).values()):
            raise ValueError("extension.rope_types is set, but no model has position_embedding_type='rope'")
        clash = [f"{name}+{kind}" for name in cfg.models for kind in cfg.extension.rope_types
                 if f"{name}+{kind}" in cfg.models]
        if clash:
            raise ValueError(f"models: {clash} clash with the names the extension step gives; rename them")


# ---- tokenizer, budget ------------------------------------------------------------------------------------------------
def shared_tokenizer(cfg, train_texts, output_dir: Path, accelerator):
    """The one tokenizer every model uses (saved in OUTPUT/tokenizer; reloaded from there when resuming)."""
    folder = output_dir / "tokenizer"
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    byte_level = cfg.tokenizer.algorithm == BYTE_LEVEL
    tokenizer = train_tokenizer(
        train_texts(),
        # byte level: the special tokens and the 256 bytes byte-level BPE starts from, so it learns no merge
        vocab_size=len(SPECIAL_TOKENS) + 256 if byte_level else cfg.tokenizer.vocab_size,
        algorithm="bpe" if byte_level else cfg.tokenizer.algorithm,
        min_frequency=cfg.tokenizer.min_frequency,
        causal=True,
        max_bytes=cfg.tokenizer.train_bytes,
    )
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(folder))
    accelerator.wait_for_everyone()
    return tokenizer


def training_flops_per_token(fields: dict, tokenizer, length: int) -> float:
    """Training FLOPs per token (``hf_xarch.summary``: 3 x forward) of a model at `length` tokens."""
    from ..model.configuration_xarch import XArchConfig
    from ..summary import summary

    config = XArchConfig(**{"vocab_size": len(tokenizer), **fields, "is_decoder": True})
    return summary(config, seq_len=length, head="causal_lm").training_flops_per_token


def budget_steps(cfg, flops_per_token: float | None, length: int, processes: int, name: str) -> int:
    """Optimizer steps that fit the budget: whole steps of micro x accumulation x processes rows of `length`."""
    tokens_per_step = cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps * processes * length
    tokens = cfg.budget.train_tokens
    if tokens is None:
        if flops_per_token is None:
            raise ValueError(f"budget.train_flops: models.{name} has an attention family without a cost in "
                             "hf_xarch.summary, so its FLOPs are unknown; use budget.train_tokens")
        tokens = _number(cfg.budget.train_flops, "budget.train_flops") / flops_per_token
    steps = int(tokens // tokens_per_step)
    if steps < 1:
        raise ValueError(f"budget: models.{name} gets {tokens:,.0f} training tokens, less than one step of "
                         f"{tokens_per_step:,} tokens; raise the budget or lower training.micro_batch_size")
    return steps


# ---- one model ----------------------------------------------------------------------------------------------------
def settings_digest(cfg, fields: dict, extra: dict | None = None) -> str:
    """A digest of every setting that changes a model's results (resuming with other settings is refused)."""
    relevant = {key: cfg[key].to_dict() for key in ("data", "tokenizer", "optimizer", "schedule", "training", "budget",
                                                    "evaluation", "measure")}
    relevant.update(seed=cfg.seed, fields=fields, extra=extra or {})
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished(folder: Path, digest: str, name: str) -> dict | None:
    """The measurements of a model finished earlier with the same settings; None if it has not finished."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    saved["lengths"] = {int(length): figures for length, figures in saved["lengths"].items()}  # JSON keys are strings
    if saved.get("settings_digest") != digest:
        raise ValueError(f"models.{name}: {path} was measured with other settings (model fields, data, budget, "
                         "evaluation...); use another output_dir or delete that model's folder to train it again")
    return saved


def pretrain_config(cfg, folder: Path, fields: dict, steps: int, block_size: int, tokenizer_dir: Path,
                    warmup_steps: int | None = None) -> Config:
    """The pretrain recipe's config for one model (`warmup_steps`: the fine-tuning's own, for an extension)."""
    values = {
        "seed": cfg.seed,
        "task": "clm",
        "output_dir": str(folder),
        "model": fields,
        "data": {**cfg.data.to_dict(), "block_size": block_size},
        "tokenizer": {**cfg.tokenizer.to_dict(), "algorithm": "bpe", "path": str(tokenizer_dir)},
        "optimizer": cfg.optimizer.to_dict(),
        "schedule": {**cfg.schedule.to_dict(), **({} if warmup_steps is None else {"warmup_steps": warmup_steps})},
        "training": {**cfg.training.to_dict(), "max_steps": steps},
        # compare scores every length itself; the recipe's own final figure (in the model's folder) is a small sample
        "evaluation": {"every_steps": 0, "batch_size": cfg.evaluation.batch_size, "max_batches": 1,
                       "final_max_batches": 1},
        "checkpoint": cfg.checkpoint.to_dict(),
        "logging": cfg.logging.to_dict(),
        "hub": {**cfg.hub.to_dict(), "push": False},
    }
    return load_config(merge(PRETRAIN_DEFAULTS, values, {"model": xarch_config_fields()}))


def training_figures(result, tokens_per_step: int, flops_per_token: float | None) -> dict:
    """What the training run says about speed: the median tokens/s over its log windows (robust to a slow first
    window and to load spikes; None when nothing was logged)."""
    rates = [record["train/tokens_per_second"] for record in result.loop.history if "train/tokens_per_second" in record]
    losses = [record["train/loss"] for record in result.loop.history if "train/loss" in record]
    tokens = result.loop.step * tokens_per_step
    return {
        "steps": result.loop.step,
        "tokens": tokens,
        "flops_per_token": flops_per_token,
        "flops": tokens * flops_per_token if flops_per_token is not None else None,
        "tokens_per_second": statistics.median(rates) if rates else None,
        "final_loss": losses[-1] if losses else None,
    }


def measure_model(accelerator, model, packed: dict, train_length: int, cfg) -> dict:
    from .measure import decode_speed, evaluate_lengths, longest_runnable, train_step_memory

    figures = {"lengths": evaluate_lengths(accelerator, model, packed, cfg)}
    if accelerator.is_main_process:
        config = model.config
        if cfg.measure.memory:
            rows = packed[train_length][0][: cfg.training.micro_batch_size] if train_length in packed else None
            if rows is not None:
                figures["train_step_peak_bytes"] = train_step_memory(model, rows.to(accelerator.device))
        if cfg.measure.decode_tokens:
            longest = max(packed)
            prompt_length = longest
            if longest_runnable(config, longest + cfg.measure.decode_tokens) is None:
                prompt_length = config.max_position_embeddings - cfg.measure.decode_tokens
            if prompt_length >= 1:
                prompt = packed[longest][0][:1, :prompt_length].to(accelerator.device)
                figures["decode"] = decode_speed(model, prompt, cfg.measure.decode_tokens)
        figures["parameters"] = model.num_parameters()
    accelerator.wait_for_everyone()
    return figures


# ---- the run --------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """One model to train: a named configuration, or an extension of one (`base`, `rope_type`)."""

    name: str
    fields: dict
    steps: int
    flops_per_token: float | None
    block_size: int
    base: str | None = None
    rope_type: str | None = None

    def digest(self, cfg) -> str:
        extra = {"steps": self.steps, "block_size": self.block_size}
        if self.base is not None:  # the extension's settings change only the extended models
            extra.update(base=self.base, rope_type=self.rope_type, extension=cfg.extension.to_dict())
        return settings_digest(cfg, self.fields, extra)


def plan_models(cfg, tokenizer, train_length: int, processes: int) -> list[Plan]:
    """Every model in training order: the named ones at the budget, then the extensions of the RoPE ones."""
    plans = []
    for name, fields in model_fields(cfg).items():
        flops = training_flops_per_token(fields, tokenizer, train_length)
        plans.append(Plan(name, fields, budget_steps(cfg, flops, train_length, processes, name), flops, train_length))
    if not cfg.extension.rope_types:
        return plans
    new_length = extension_length(cfg)
    rows_per_step = cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps * processes
    steps = cfg.extension.train_tokens // (rows_per_step * new_length)
    if steps < 1:
        raise ValueError(f"extension.train_tokens={cfg.extension.train_tokens} is less than one step of "
                         f"{rows_per_step * new_length:,} tokens at the new length {new_length}")
    for name, fields in model_fields(cfg).items():
        if fields.get("position_embedding_type") == "rope":
            flops = training_flops_per_token(fields, tokenizer, new_length)
            plans += [Plan(f"{name}+{kind}", fields, steps, flops, new_length, name, kind)
                      for kind in cfg.extension.rope_types]
    return plans


def train_and_measure(cfg, plan: Plan, digest: str, tokenizer, packed: dict, results: dict, accelerator,
                      rows_per_step: int, overall) -> dict:
    """Train one model with the pretrain recipe in OUTPUT/models/NAME, measure it, save its measurements.json."""
    output_dir = Path(cfg.output_dir)
    folder = output_dir / "models" / plan.name
    model = None
    if plan.base is not None:
        model = extended_model(output_dir / "models" / plan.base, plan.block_size, plan.rope_type,
                               cfg.extension.rope_kwargs.get(plan.rope_type, {}))
    tokens_per_step = rows_per_step * plan.block_size

    def advance(step, record):
        if overall is not None:
            overall.update(tokens_per_step)

    pretrain_cfg = pretrain_config(cfg, folder, plan.fields, plan.steps, plan.block_size, output_dir / "tokenizer",
                                   cfg.extension.warmup_steps if plan.base is not None else None)
    trained = run_pretrain(pretrain_cfg, callbacks=[advance], model=model, tokenizer=tokenizer,
                           description=f"{plan.name} ({plan.steps} steps)")
    entry = {
        "fields": plan.fields,
        "trained_length": plan.block_size,
        "train": training_figures(trained, tokens_per_step, plan.flops_per_token),
        "pretrain_eval": format_scores(trained.eval_metrics),
        "settings_digest": digest,
    }
    if plan.base is not None:
        entry["extends"] = {"model": plan.base, "rope_type": plan.rope_type, "new_length": plan.block_size}
        base_train = results[plan.base]["train"]
        entry["train"]["base_tokens"], entry["train"]["base_flops"] = base_train["tokens"], base_train["flops"]
    entry.update(measure_model(accelerator, trained.loop.model, packed, plan.block_size, cfg))
    if accelerator.is_main_process:
        (folder / RESULT_FILE).write_text(json.dumps(entry, indent=1, default=str))
    return entry


def run_compare(cfg: Config) -> dict:
    """Train and measure every model (skipping finished ones), then write the report; returns results.json's data."""
    from accelerate.state import PartialState

    from ..train.data import load_records
    from .measure import heldout_blocks
    from .report import write_report

    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    records = load_records(cfg.data, cfg.seed)
    column = cfg.data.text_column
    train_texts = (lambda: (r[column] for r in records.train)) if records.train is not None else (
        lambda: (r[column] for r in records.stream(0)))
    tokenizer = shared_tokenizer(cfg, train_texts, output_dir, accelerator)
    train_length = cfg.data.block_size
    # the training length is always scored: every extrapolation figure is relative to it
    lengths = sorted(set(evaluation_lengths(cfg)) | {train_length})
    if cfg.extension.rope_types:
        lengths = sorted(set(lengths) | {extension_length(cfg)})
    packed = heldout_blocks([r[column] for r in records.heldout], tokenizer, lengths)
    processes = PartialState().num_processes
    rows_per_step = cfg.training.micro_batch_size * cfg.training.gradient_accumulation_steps * processes

    results: dict[str, dict] = {}
    todo = []
    for plan in plan_models(cfg, tokenizer, train_length, processes):
        digest = plan.digest(cfg)
        done = finished(output_dir / "models" / plan.name, digest, plan.name)
        if done is not None:
            results[plan.name] = done
            accelerator.print(f"compare: {plan.name}: finished earlier, measurements loaded")
        else:
            todo.append((plan, digest))
    overall = _overall_bar(cfg, accelerator, sum(plan.steps * rows_per_step * plan.block_size for plan, _ in todo))
    for plan, digest in todo:
        results[plan.name] = train_and_measure(cfg, plan, digest, tokenizer, packed, results, accelerator,
                                               rows_per_step, overall)
    if overall is not None:
        overall.close()
    data = None
    if accelerator.is_main_process:
        data = write_report(output_dir, cfg, results, train_length, lengths, processes, accelerator.device)
        print(f"compare: {len(results)} models; report in {output_dir / 'report.md'}")
        for line in data["summary"]:
            print("  " + line)
    accelerator.wait_for_everyone()
    return data


def extended_model(folder: Path, new_length: int, rope_type: str, rope_kwargs):
    """The trained model in `folder`, extended from the length it was trained at to `new_length` (``none``: as it is,
    to fine-tune at the longer length without rescaling its RoPE)."""
    from transformers import AutoModelForCausalLM

    from ..context import extend_context
    from ..train.pretrain import TRAINED_LENGTH_FIELD

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    trained = getattr(model.config, TRAINED_LENGTH_FIELD)
    if rope_type == NO_RESCALING:
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, new_length)
        return model
    # the scaling starts from the trained length, not from a position table built larger (YaRN reads it as the
    # original context; position interpolation divides positions by new_length / trained)
    model.config.max_position_embeddings = trained
    kwargs = rope_kwargs.to_dict() if isinstance(rope_kwargs, Config) else dict(rope_kwargs)
    return extend_context(model, new_length / trained, rope_type=rope_type, **kwargs)


def _overall_bar(cfg, accelerator, total_tokens: int):
    """The progress bar over every model still to train, in training tokens (time left counts training only)."""
    if not (cfg.logging.progress_bar and accelerator.is_main_process and total_tokens):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_tokens, desc="compare: all models", unit="tok", unit_scale=True, position=1,
                dynamic_ncols=True)


def budget_overrides(argv: list[str]) -> list[str]:
    """A budget given on the command line replaces the config file's: the other budget key is cleared (the last one
    given wins)."""
    given = [key for arg in argv for key in BUDGET_KEYS if arg.startswith(f"budget.{key}=")]
    return [f"budget.{other}=null" for other in BUDGET_KEYS if given and other != given[-1]]


def parse_command_line(argv: list[str]) -> Config | None:
    """``[--config FILE] [key=value ...]`` into a config (None when it only printed help or the config)."""
    return parse_args(argv + budget_overrides(argv), DEFAULTS, __doc__, open_sections=open_sections())


def main(argv: list[str] | None = None) -> int:
    import sys

    cfg = parse_command_line(list(sys.argv[1:] if argv is None else argv))
    if cfg is None:
        return 0
    run_compare(cfg)
    return 0
