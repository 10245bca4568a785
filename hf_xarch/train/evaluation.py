"""Held-out evaluation: loss, perplexity and bits per byte for language models; accuracy and F1 for classifiers;
BLEU, chrF and ROUGE of generated text for encoder-decoders.

What is scored is stated with the numbers: the whole held-out set, or a seeded random sample drawn uniformly from all
of it (never its first rows: held-out text in document order is not a sample of anything). Every result carries
``eval/coverage`` (a sentence saying which, and how many blocks or examples, tokens and bytes were scored) and the
counts behind it, so logs, ``eval_results.json`` and the model card say what their numbers cover.

Each process evaluates rows ``rank::world`` of what is scored and the sums are reduced, so the numbers do not depend
on how many processes ran. Evaluation runs the unwrapped model (no DDP hooks: no collectives inside forward, so
processes may hold different numbers of rows). Accuracy, F1, BLEU, chrF and ROUGE come from the `evaluate` modules
hf_xarch ships (``hf_xarch/metrics``), because metrics on the Hub cannot be loaded offline.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .data import mask_for_mlm, pad_batch
from .text_pairs import pad_pairs

EVAL_MASK_SEED = 1234  # one fixed masking for every evaluation, so MLM eval losses are comparable across steps
# the counts that say what an evaluation covered (not scores: they stay out of the card's metric table)
COVERAGE_KEYS = ("eval/coverage", "eval/blocks", "eval/heldout_blocks", "eval/examples", "eval/heldout_examples",
                 "eval/tokens", "eval/bytes", "eval/sample_seed")


def check_evaluation(cfg) -> None:
    """The ``evaluation`` section's sample sizes: a bad one fails when the config is built, not after training."""
    for name in ("max_batches", "final_max_batches"):
        value = cfg.evaluation.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"evaluation.{name}={value!r} is not allowed: an integer >= 0 (0 or null: the whole "
                             "held-out set)")


def sample_rows(count: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """The rows an evaluation scores: None for all `count` of them (no `limit`, or a limit that covers the set), else
    `limit` rows drawn uniformly without replacement, seeded so that every evaluation of a run scores the same rows
    (comparable across steps, and the same on every process)."""
    if not limit or limit >= count:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def _coverage(metrics: dict, unit: str, scored: int, total: int, sampled: bool, seed: int, extra: str) -> dict:
    """Adds the counts and the ``eval/coverage`` sentence to `metrics`."""
    metrics[f"eval/{unit}"] = scored
    metrics[f"eval/heldout_{unit}"] = total
    if sampled:
        metrics["eval/sample_seed"] = seed
        where = f"a random sample (uniform, seed {seed}) of {scored:,} of the {total:,} held-out {unit}"
    else:
        where = f"the whole held-out set: {total:,} {unit}"
    metrics["eval/coverage"] = where + extra
    return metrics


def format_scores(metrics: dict) -> str:
    """The scores in `metrics` and what they were scored on, for a one-line summary."""
    scores = ", ".join(f"{key.split('/', 1)[1].replace('_', ' ')} {value:.4g}" for key, value in metrics.items()
                       if key not in COVERAGE_KEYS)
    return f"{scores} (on {metrics['eval/coverage']})" if "eval/coverage" in metrics else scores


def _shard(count: int, rank: int, world: int) -> range:
    return range(rank, count, world)


def _eval_model(accelerator, model):
    """The model to run for evaluation. Sharded engines (FSDP, DeepSpeed) must run the wrapped model on every process
    (their forward gathers parameters); plain DDP and single processes run the unwrapped one (no hooks)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return model
    return accelerator.unwrap_model(model)


@contextmanager
def _eval_mode(model):
    """`model` in eval mode for the block, back in training mode after it if it was training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def _sample_and_shard(accelerator, examples: list, max_batches: int | None, batch_size: int, seed: int):
    """The examples an evaluation scores (all of them, or the seeded sample of `sample_rows`), this process's shard
    of them, and whether they are a sample."""
    sample = sample_rows(len(examples), (max_batches or 0) * batch_size, seed)
    if sample is not None:
        examples = [examples[i] for i in sample.tolist()]
    mine = [examples[i] for i in _shard(len(examples), accelerator.process_index, accelerator.num_processes)]
    return examples, mine, sample is not None


def _gather_pairs(accelerator, predictions: list, references: list) -> tuple[list, list]:
    """Every process's predictions and references, in one list each; refuses an empty held-out set."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        predictions, references = gather_object(predictions), gather_object(references)
    if not references:
        raise ValueError("the held-out set is empty; raise data.heldout_fraction or add data")
    return predictions, references


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
    sample_seed: int = 0,
) -> dict:
    """Mean loss per predicted token over `blocks` (rows of token ids), its exponential (perplexity) and, for causal
    LMs, bits per byte: loss / ln 2 * tokens / bytes, the tokenizer-independent number (Gao et al. 2020, The Pile).

    `max_batches` (a total over all processes, so the number does not depend on how many ran) limits the evaluation
    to a random sample of ``max_batches x batch_size`` blocks (see `sample_rows`); unset, every block is scored.
    ``eval/bytes`` is the scored tokens x the held-out text's bytes per token: the denominator of bits per byte."""
    model = _eval_model(accelerator, model)
    device = accelerator.device
    if len(blocks) == 0:
        raise ValueError("the held-out set has no blocks to evaluate; raise data.heldout_fraction or add data")
    if task == "mlm":  # masked over the whole set, so a block's masking does not depend on which sample it is in
        inputs, labels = mask_for_mlm(
            blocks, tokenizer, mlm_probability, torch.Generator().manual_seed(EVAL_MASK_SEED)
        )
    else:
        inputs, labels = blocks, blocks
    sample = sample_rows(len(blocks), (max_batches or 0) * batch_size, sample_seed)
    if sample is not None:
        inputs, labels = inputs[sample], labels[sample]
    rows = inputs
    mine = list(_shard(len(rows), accelerator.process_index, accelerator.num_processes))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, number of tokens)
    with _eval_mode(model):
        for start in _batch_starts(len(rows), batch_size, accelerator.num_processes):
            index = torch.tensor(mine[start : start + batch_size] or [0], dtype=torch.long)  # row 0: zero-weight filler
            batch_inputs, batch_labels = inputs[index].to(device), labels[index].to(device)
            count = int((batch_labels[:, 1:] if task == "clm" else batch_labels).ne(-100).sum())
            filler = start >= len(mine)
            if count == 0 and not filler:
                continue
            loss = model(input_ids=batch_inputs, labels=batch_labels).loss
            if not filler:
                total += torch.tensor([float(loss) * count, count], dtype=torch.float64, device=device)
    total = accelerator.reduce(total, reduction="sum")
    if total[1] == 0:
        raise ValueError("the held-out set has no tokens to evaluate; raise data.heldout_fraction or add data")
    loss, tokens = float(total[0] / total[1]), int(total[1])
    metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0))}
    extra = f", {tokens:,} {'masked' if task == 'mlm' else 'predicted'} tokens"
    if task == "clm" and bytes_per_token:
        metrics["eval/bits_per_byte"] = loss / math.log(2) / bytes_per_token
        metrics["eval/bytes"] = round(tokens * bytes_per_token)
        extra += f", {metrics['eval/bytes']:,} bytes"
    metrics["eval/tokens"] = tokens
    return _coverage(metrics, "blocks", len(rows), len(blocks), sample is not None, sample_seed, extra)


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
    max_batches: int | None = None,
    sample_seed: int = 0,
) -> dict:
    """Loss, accuracy and F1 (macro over classes; binary F1 of class 1 when there are two) on held-out `examples`
    (dicts with ``input_ids`` and ``labels``; token labels are -100 where not scored). `max_batches` limits it to a
    random sample of ``max_batches x batch_size`` examples, as in `evaluate_lm`."""
    model = _eval_model(accelerator, model)
    device = accelerator.device
    heldout = len(examples)
    examples, mine, sampled = _sample_and_shard(accelerator, examples, max_batches, batch_size, sample_seed)
    predictions, references = [], []
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with _eval_mode(model):
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
    predictions, references = _gather_pairs(accelerator, predictions, references)
    average = "binary" if num_labels == 2 else "macro"
    result = {"eval/loss": float(total[0] / max(total[1], 1))}
    result["eval/accuracy"] = metrics["accuracy"].compute(predictions=predictions, references=references)["accuracy"]
    result["eval/f1"] = metrics["f1"].compute(
        predictions=predictions, references=references, average=average, labels=list(range(num_labels))
    )["f1"]
    extra = ""
    if task == "token":  # accuracy and F1 count labelled tokens (the first sub-token of each word)
        result["eval/tokens"] = len(references)
        extra = f", {len(references):,} labelled tokens"
    return _coverage(result, "examples", len(examples), heldout, sampled, sample_seed, extra)


@torch.no_grad()
def evaluate_seq2seq(
    accelerator,
    model,
    examples: list[dict],
    batch_size: int,
    tokenizer,
    metrics: dict,
    generation: dict,
    max_batches: int | None = None,
    sample_seed: int = 0,
) -> dict:
    """Teacher-forced loss per target token, and BLEU, chrF (0-100) and ROUGE F-measures (0-1) of the text that
    ``generate(**generation)`` writes for each source, scored against the example's reference text. `examples` come
    from ``text_pairs.encode_pairs``; `max_batches` limits it to a random sample, as in `evaluate_lm`. Generation runs
    on the unwrapped model, so not under FSDP or DeepSpeed (the recipe refuses those)."""
    model = accelerator.unwrap_model(model)
    device = accelerator.device
    heldout = len(examples)
    examples, mine, sampled = _sample_and_shard(accelerator, examples, max_batches, batch_size, sample_seed)
    predictions, references = [], []
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with _eval_mode(model):
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = {key: value.to(device) for key, value in pad_pairs(chunk, tokenizer.pad_token_id).items()}
            count = int(batch["labels"].ne(-100).sum())
            total += torch.tensor([float(model(**batch).loss) * count, count], dtype=torch.float64, device=device)
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       **generation)
            predictions += [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
            references += [e["target"] for e in chunk]
    total = accelerator.reduce(total, reduction="sum")
    predictions, references = _gather_pairs(accelerator, predictions, references)
    result = {"eval/loss": float(total[0] / max(total[1], 1))}
    result["eval/bleu"] = metrics["bleu"].compute(predictions=predictions, references=references)["score"]
    result["eval/chrf"] = metrics["chrf"].compute(predictions=predictions, references=references)["score"]
    rouge = metrics["rouge"].compute(predictions=predictions, references=references)
    result.update({f"eval/{name}": value for name, value in rouge.items()})
    decoding = f"beam search ({generation['num_beams']} beams)" if generation.get("num_beams", 1) > 1 else "greedy"
    extra = f", {decoding} decoding of at most {generation['max_new_tokens']} new tokens"
    return _coverage(result, "examples", len(examples), heldout, sampled, sample_seed, extra)


def _classifier_batch(model, chunk: list[dict], pad_id: int, task: str, device):
    if task == "token":
        batch = pad_batch([e["input_ids"] for e in chunk], pad_id, [e["labels"] for e in chunk])
    else:
        batch = pad_batch([e["input_ids"] for e in chunk], pad_id)
        batch["labels"] = torch.tensor([e["labels"] for e in chunk], dtype=torch.long)
    batch = {key: value.to(device) for key, value in batch.items()}
    return model(**batch), batch["labels"]
