"""Held-out evaluation: loss, perplexity and bits per byte for language models; accuracy and F1 for classifiers.

Each process evaluates rows ``rank::world`` and the sums are reduced, so the numbers do not depend on how many
processes ran. Evaluation runs the unwrapped model (no DDP hooks: no collectives inside forward, so processes may
hold different numbers of rows). Accuracy and F1 come from the `evaluate` modules hf_xarch ships
(``hf_xarch/metrics``), because metrics on the Hub cannot be loaded offline.
"""

from __future__ import annotations

import math

import torch

from .data import mask_for_mlm, pad_batch

EVAL_MASK_SEED = 1234  # one fixed masking for every evaluation, so MLM eval losses are comparable across steps


def _shard(count: int, rank: int, world: int) -> range:
    return range(rank, count, world)


def _eval_model(accelerator, model):
    """The model to run for evaluation. Sharded engines (FSDP, DeepSpeed) must run the wrapped model on every process
    (their forward gathers parameters); plain DDP and single processes run the unwrapped one (no hooks)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return model
    return accelerator.unwrap_model(model)


def _batch_starts(count: int, batch_size: int, world: int) -> range:
    """Batch offsets into this process's shard; every process gets the same number of batches (a process whose
    shard ran out gets empty batches), so collectives inside a sharded model's forward line up."""
    longest = -(-count // world) if world else count  # ceil: the biggest shard
    return range(0, max(longest, 1), batch_size)


@torch.no_grad()
def evaluate_lm(
    accelerator,
    model,
    blocks: torch.Tensor,
    batch_size: int,
    task: str = "clm",
    tokenizer=None,
    mlm_probability: float = 0.15,
    bytes_per_token: float | None = None,
    max_batches: int | None = None,
) -> dict:
    """Mean loss per predicted token over `blocks` (rows of token ids), its exponential (perplexity) and, for causal
    LMs, bits per byte: loss / ln 2 * tokens / bytes, the tokenizer-independent number (Gao et al. 2020, The Pile)."""
    model = _eval_model(accelerator, model)
    was_training = model.training
    model.eval()
    device = accelerator.device
    rows = blocks
    if len(rows) == 0:
        raise ValueError("the held-out set has no blocks to evaluate; raise data.heldout_fraction or add data")
    if max_batches:  # a total over all processes, so the number does not depend on how many ran
        rows = rows[: max_batches * batch_size]
    if task == "mlm":
        inputs, labels = mask_for_mlm(
            rows, tokenizer, mlm_probability, torch.Generator().manual_seed(EVAL_MASK_SEED)
        )
    else:
        inputs, labels = rows, rows
    mine = list(_shard(len(rows), accelerator.process_index, accelerator.num_processes))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, number of tokens)
    for start in _batch_starts(len(rows), batch_size, accelerator.num_processes):
        index = torch.tensor(mine[start : start + batch_size] or [0], dtype=torch.long)  # row 0 as a zero-weight filler
        batch_inputs, batch_labels = inputs[index].to(device), labels[index].to(device)
        count = int((batch_labels[:, 1:] if task == "clm" else batch_labels).ne(-100).sum())
        filler = start >= len(mine)
        if count == 0 and not filler:
            continue
        loss = model(input_ids=batch_inputs, labels=batch_labels).loss
        if not filler:
            total += torch.tensor([float(loss) * count, count], dtype=torch.float64, device=device)
    total = accelerator.reduce(total, reduction="sum")
    if was_training:
        model.train()
    if total[1] == 0:
        raise ValueError("the held-out set has no tokens to evaluate; raise data.heldout_fraction or add data")
    loss = float(total[0] / total[1])
    metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0)), "eval/tokens": int(total[1])}
    if task == "clm" and bytes_per_token:
        metrics["eval/bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return metrics


@torch.no_grad()
def evaluate_classifier(
    accelerator,
    model,
    examples: list[dict],
    batch_size: int,
    pad_id: int,
    task: str,
    metrics: dict,
    num_labels: int,
) -> dict:
    """Loss, accuracy and F1 (macro over classes; binary F1 of class 1 when there are two) on held-out `examples`
    (dicts with ``input_ids`` and ``labels``; token labels are -100 where not scored)."""
    from accelerate.utils import gather_object

    model = _eval_model(accelerator, model)
    was_training = model.training
    model.eval()
    device = accelerator.device
    mine = [examples[i] for i in _shard(len(examples), accelerator.process_index, accelerator.num_processes)]
    predictions, references = [], []
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in _batch_starts(len(examples), batch_size, accelerator.num_processes):
        chunk = mine[start : start + batch_size]
        if not chunk:  # this process's shard ran out: a filler batch whose results are dropped
            if examples:
                _classifier_batch(model, examples[:1], pad_id, task, device)
            continue
        output, labels = _classifier_batch(model, chunk, pad_id, task, device)
        chosen = output.logits.argmax(-1)
        if task == "token":
            scored = labels.ne(-100)
            predictions += chosen[scored].tolist()
            references += labels[scored].tolist()
            count = int(scored.sum())
        else:
            predictions += chosen.tolist()
            references += labels.tolist()
            count = len(chunk)
        total += torch.tensor([float(output.loss) * count, count], dtype=torch.float64, device=device)
    total = accelerator.reduce(total, reduction="sum")
    predictions = gather_object(predictions) if accelerator.num_processes > 1 else predictions
    references = gather_object(references) if accelerator.num_processes > 1 else references
    if was_training:
        model.train()
    if not references:
        raise ValueError("the held-out set is empty; raise data.heldout_fraction or add data")
    average = "binary" if num_labels == 2 else "macro"
    result = {"eval/loss": float(total[0] / max(total[1], 1))}
    result["eval/accuracy"] = metrics["accuracy"].compute(predictions=predictions, references=references)["accuracy"]
    result["eval/f1"] = metrics["f1"].compute(
        predictions=predictions, references=references, average=average, labels=list(range(num_labels))
    )["f1"]
    return result


def _classifier_batch(model, chunk: list[dict], pad_id: int, task: str, device):
    if task == "token":
        batch = pad_batch([e["input_ids"] for e in chunk], pad_id, [e["labels"] for e in chunk])
    else:
        batch = pad_batch([e["input_ids"] for e in chunk], pad_id)
        batch["labels"] = torch.tensor([e["labels"] for e in chunk], dtype=torch.long)
    batch = {key: value.to(device) for key, value in batch.items()}
    return model(**batch), batch["labels"]
