"""The training loop every recipe shares: Accelerate, gradient accumulation, mixed precision, warm-up + decay,
gradient clipping, periodic logging / evaluation / checkpoints, exact resumption.

One optimizer step consumes one *global batch* of ``micro_batch_size x accumulation x processes`` examples, taken
in a seeded order (``data.ExampleOrder``). Micro-batch m of process p is rows ``[(m*P + p)*b, (m*P + p + 1)*b)``,
so the rows that make up a step do not depend on the number of processes. Every micro-batch loss is weighted by its
share of the step's loss items (tokens with a label, or examples) and by P (DDP averages over processes), so the
gradient is that of the mean loss over the whole global batch - the same for 1 process x 4 rows as for 2 processes
x 2 rows, and for MLM batches whose micro-batches hold different numbers of masked tokens (the correction
transformers' Trainer makes with ``num_items_in_batch``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from .data import ExampleOrder, slice_batch
from .tracking import MetricsLogger


@dataclass
class LoopSettings:
    max_steps: int
    micro_batch_size: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    log_every: int = 10
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_last: int | None = 2
    checkpoint_dir: str | Path | None = None
    resume: str = "auto"  # "auto": the latest valid checkpoint in checkpoint_dir, "never", or a checkpoint path
    progress_bar: bool = True
    description: str = "training"

    def __post_init__(self):
        for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"training.{name}={value!r} is not allowed: a positive integer")
        for name in ("log_every", "eval_every", "checkpoint_every", "keep_last"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} is not allowed: an integer >= 0 (0 or null: never)")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"training.max_grad_norm={self.max_grad_norm} is not allowed: >= 0 (0 or null: no clip)")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise ValueError(f"checkpoint.resume={self.resume!r} is not allowed: 'auto', 'never' or a checkpoint folder")


@dataclass
class LoopResult:
    model: torch.nn.Module  # unwrapped
    state_dict: dict | None  # the full state dict, gathered on every process (FSDP/DeepSpeed shard it); for saving
    step: int
    history: list[dict]
    resumed_from: str | None
    seconds: float
    tokens: int
    final_eval: dict = field(default_factory=dict)


def count_label_items(batch: dict, causal: bool) -> int:
    """Loss items in `batch`: labelled tokens (after the causal shift) or, for per-sequence labels, examples."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.shape[0]
    if causal:
        labels = labels[:, 1:]
    return int(labels.ne(-100).sum())


def progress_postfix(record: dict) -> dict:
    """The progress bar's labels for the losses in a log record: train and held-out loss must not share a name."""
    labels = {"train/loss": "train_loss", "eval/loss": "heldout_loss"}
    return {label: f"{record[key]:.3g}" for key, label in labels.items() if key in record}


def _input_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _zero_loss(output) -> torch.Tensor:
    """A zero that still reaches every parameter's graph: a micro-batch with no labelled token must take part in
    DDP's gradient all-reduce like the others."""
    return output.logits.float().sum() * 0.0


def train(
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    order: ExampleOrder,
    collate: Callable[[list, int], dict],
    settings: LoopSettings,
    causal: bool,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    logger: MetricsLogger | None = None,
    callbacks: Iterable[Callable[[int, dict], None]] = (),
    final_evaluate: Callable[[torch.nn.Module], dict] | None = None,
) -> LoopResult:
    """Train `model` for `settings.max_steps` optimizer steps; returns the unwrapped model and the history.

    `collate(examples, step)` turns the step's global batch into tensors (it may use `step` to seed MLM masking).
    `evaluate(model)` returns metrics (every process calls it; it reduces internally); after the last step
    `final_evaluate` runs instead when given (the reported figure may cover more than the cheap evaluations during
    training). `callbacks` are called as `callback(step, record)` on every process after each step (and after a
    checkpoint at that step)."""
    logger = logger or MetricsLogger(".", enabled=False)
    model, optimizer = accelerator.prepare(model, optimizer)
    # the scheduler is registered, not prepared: Accelerate's wrapper steps it once per process per step, which would
    # make the schedule depend on the number of processes
    accelerator.register_for_checkpointing(scheduler)
    world, rank, micro = accelerator.num_processes, accelerator.process_index, settings.micro_batch_size
    accumulation = settings.gradient_accumulation_steps
    global_rows = micro * accumulation * world
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and accumulation > 1:
        # DeepSpeed steps inside backward unless it runs the accumulation itself; ours would step every micro-batch
        raise ValueError(
            "training.gradient_accumulation_steps > 1 is not supported under DeepSpeed by this loop; "
            "use a larger training.micro_batch_size (or more processes) instead"
        )

    step, resumed_from, tokens_before = 0, None, 0
    checkpoint = None
    if settings.resume == "auto" and settings.checkpoint_dir is not None:
        checkpoint = latest_valid_checkpoint(settings.checkpoint_dir)
    elif settings.resume not in ("auto", "never"):
        checkpoint = Path(settings.resume)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        step, tokens_before = int(state["step"]), int(state.get("tokens", 0))
        order.load_state_dict(state["data"])
        logger.restore(state.get("history", []))
        resumed_from = str(checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {step}")

    model.train()
    progress = None
    if settings.progress_bar and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=settings.max_steps, initial=step, desc=settings.description, dynamic_ncols=True)
    device = accelerator.device
    window_loss = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of item losses, items) since last log
    # throughput counts training time only (not evaluation or checkpoint writes)
    window_seconds, window_tokens = 0.0, 0
    tokens_seen = tokens_before
    started = time.perf_counter()
    final_eval: dict = {}
    shown: dict = {}  # the progress bar's postfix: the latest train loss and the latest held-out loss
    while step < settings.max_steps:
        step_started = time.perf_counter()
        batch = collate(order.take(global_rows), step)
        total_items = count_label_items(batch, causal)
        for index in range(accumulation):
            start = (index * world + rank) * micro
            part = {key: value.to(device) for key, value in slice_batch(batch, start, start + micro).items()}
            items = count_label_items(part, causal)
            last = index == accumulation - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    output = model(**part)
                loss = output.loss if items > 0 else _zero_loss(output)
                weight = items * world / total_items if total_items else 0.0
                accelerator.backward(loss * weight)
            # kept on the device: no host sync per micro-batch
            window_loss[0] += loss.detach().double() * items
            window_loss[1] += items
        grad_norm = None
        if settings.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        if not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow: the step was skipped, so is the LR
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_seconds += time.perf_counter() - step_started
        step_tokens = _input_tokens(batch)
        tokens_seen += step_tokens
        window_tokens += step_tokens
        if progress is not None:
            progress.update(1)

        record: dict = {}
        if settings.log_every and (step % settings.log_every == 0 or step == settings.max_steps):
            summed = accelerator.reduce(window_loss.clone(), reduction="sum")
            record = {
                "step": step,
                "train/loss": float(summed[0] / summed[1]) if summed[1] > 0 else float("nan"),
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_second": window_tokens / window_seconds if window_seconds > 0 else 0.0,
                "train/tokens": tokens_seen,
            }
            if grad_norm is not None:
                record["train/grad_norm"] = float(grad_norm)
            window_loss.zero_()
            window_seconds, window_tokens = 0.0, 0
        if evaluate is not None and (
            (settings.eval_every and step % settings.eval_every == 0) or step == settings.max_steps
        ):
            final_eval = (final_evaluate or evaluate)(model) if step == settings.max_steps else evaluate(model)
            record = {"step": step, **record, **final_eval}
        if record:
            logger.log(record)  # every process keeps the history (only the main one writes), so checkpoints agree
            if progress is not None:
                shown.update(progress_postfix(record))
                progress.set_postfix(shown)
        if settings.checkpoint_every and settings.checkpoint_dir is not None and step % settings.checkpoint_every == 0:
            trainer_state = {"step": step, "tokens": tokens_seen, "data": order.state_dict(), "history": logger.history}
            save_checkpoint(accelerator, settings.checkpoint_dir, step, trainer_state, settings.keep_last)
        for callback in callbacks:
            callback(step, record)
    if progress is not None:
        progress.close()
    accelerator.wait_for_everyone()
    # a collective under FSDP/DeepSpeed, so every process calls it; plain models just return their state dict
    state_dict = accelerator.get_state_dict(model)
    return LoopResult(
        model=accelerator.unwrap_model(model),
        state_dict=state_dict,
        step=step,
        history=logger.history,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
        tokens=tokens_seen - tokens_before,
        final_eval=final_eval,
    )
