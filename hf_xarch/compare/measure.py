"""What `hf-xarch compare` measures on each trained model: held-out bits per byte, forward speed and memory at every
evaluation length; the memory of one training step; decode speed and cache memory after the longest length.

Memory is what tensors hold, not what the process's allocator keeps: on CUDA ``torch.cuda.max_memory_allocated``; on
CPU the allocations and frees torch.profiler records, summed in time order (a process's RSS high-water mark never goes
down, so it cannot tell models measured one after another apart). Both count memory live beyond what existed before
the measured call (the weights, the optimizer state), so the figures compare activations and caches.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable

import torch

from ..model.registry import POSITION_SCHEMES
from ..train.data import pack_blocks
from ..train.evaluation import evaluate_lm


def longest_runnable(config, length: int) -> int | None:
    """`length` if the model can run a sequence that long, else None: a learned table (a bounded position scheme) has
    no vector past ``max_position_embeddings``."""
    if POSITION_SCHEMES[config.position_embedding_type].bounded and length > config.max_position_embeddings:
        return None
    return length


def heldout_blocks(texts: list[str], tokenizer, lengths: list[int]) -> dict[int, tuple[torch.Tensor, float]]:
    """The held-out text packed at every length: {length: (blocks, bytes per token)}; bits per byte divides by the
    bytes the scored tokens stand for."""
    packed = {}
    for length in lengths:
        blocks, counts = pack_blocks(texts, tokenizer, length, causal=True)
        if len(blocks) == 0:
            raise ValueError(
                f"evaluation.lengths: the held-out text ({counts['tokens']} tokens) is shorter than one block of "
                f"{length}; raise data.heldout_fraction or data.max_bytes, or drop that length"
            )
        packed[length] = (blocks, counts["bytes"] / counts["tokens"])
    return packed


def sample_batches(rows: int, length: int, tokens_per_length: int, batch_size: int) -> tuple[int, int | None]:
    """(batch size, max_batches for `evaluate_lm`) scoring about `tokens_per_length` tokens at `length` (0: every
    block): the same amount of text at every length, as a seeded random sample of whole blocks."""
    if not tokens_per_length:
        return batch_size, None
    wanted = max(1, math.ceil(tokens_per_length / length))
    batch = min(batch_size, wanted)
    batches = math.ceil(wanted / batch)
    return batch, (None if batches * batch >= rows else batches)


def peak_memory_bytes(function: Callable[[], object], device: torch.device) -> int:
    """The most memory tensors held during `function()` beyond what they held before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # kineto prints a line to stderr at every start and stop
        prof.start()
    try:
        function()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage  # allocations within the op, minus its frees ("[memory]" events: frees)
        peak = max(peak, live)
    return int(peak)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send what C++ code writes to file descriptor 2 to /dev/null for the duration (Python's own stderr too)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tensor_bytes(value, seen: set | None = None) -> int:
    """Bytes of every distinct tensor storage reachable from `value` through attributes, tuples, lists and dicts (a
    cache layer of any family: key/value tensors, a Performer's running state, a sliding window's buffer)."""
    seen = set() if seen is None else seen
    if torch.is_tensor(value):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen or value.device.type == "meta":
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(item, seen) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item, seen) for item in value)
    if hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
        return sum(tensor_bytes(item, seen) for item in vars(value).values())
    return 0


def cache_bytes(cache) -> int:
    """What a transformers cache holds, over all its layers: the storage behind its tensors, so a window kept as a view
    of the prefill's keys counts the whole prefill (that memory stays allocated until the view is replaced)."""
    return sum(tensor_bytes(layer) for layer in getattr(cache, "layers", [cache]))


def evaluate_lengths(accelerator, model, packed: dict, cfg) -> dict[int, dict]:
    """Per evaluation length: bits per byte (``evaluate_lm``: the whole held-out set or a seeded random sample, stated
    in ``coverage``), forward tokens/s, the peak memory of one forward of one row, and its cache bytes. A length the
    model cannot run (a learned table too short) is recorded with the reason instead of numbers."""
    results = {}
    for length, (blocks, bytes_per_token) in packed.items():
        if longest_runnable(model.config, length) is None:
            results[length] = {"skipped": (f"position_embedding_type={model.config.position_embedding_type!r} holds "
                                           f"max_position_embeddings={model.config.max_position_embeddings} positions")}
            continue
        batch, max_batches = sample_batches(len(blocks), length, cfg.evaluation.tokens_per_length,
                                            cfg.evaluation.batch_size)
        started = time.perf_counter()
        metrics = evaluate_lm(accelerator, model, blocks, batch, bytes_per_token=bytes_per_token,
                              max_batches=max_batches, sample_seed=cfg.seed)
        seconds = time.perf_counter() - started
        entry = {
            "bits_per_byte": metrics["eval/bits_per_byte"],
            "loss": metrics["eval/loss"],
            "coverage": metrics["eval/coverage"],
            "eval_tokens": metrics["eval/tokens"],
            "forward_tokens_per_second": metrics["eval/tokens"] / seconds if seconds > 0 else None,
        }
        if accelerator.is_main_process and cfg.measure.memory:
            entry.update(forward_memory(model, blocks[:1].to(accelerator.device)))
        results[length] = entry
    return results


@torch.no_grad()
def forward_memory(model, row: torch.Tensor) -> dict:
    """Peak memory of one cached forward over `row` (one sequence) and the bytes its cache then holds."""
    model.eval()
    holder = {}

    def forward():
        holder["cache"] = model(input_ids=row, use_cache=True).cache

    peak = peak_memory_bytes(forward, row.device)
    return {"forward_peak_bytes": peak, "cache_bytes": cache_bytes(holder.pop("cache"))}


def train_step_memory(model, rows: torch.Tensor) -> int:
    """Peak memory of one forward + backward over a micro-batch at the training length (gradients dropped after)."""
    model.train()

    def step():
        model(input_ids=rows, labels=rows).loss.backward()

    peak = peak_memory_bytes(step, rows.device)
    model.zero_grad(set_to_none=True)
    model.eval()
    return peak


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy decoding of `new_tokens` after a `prompt` (one sequence) with the model's cache: tokens/s of the decode
    steps only (the prefill is timed apart), and the cache bytes after the prompt and at the end."""
    model.eval()
    output = model(input_ids=prompt, use_cache=True)
    cache = output.cache
    after_prompt = cache_bytes(cache)
    token = output.logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for _ in range(new_tokens):
        output = model(input_ids=token, cache=cache, use_cache=True)
        cache = output.cache
        token = output.logits[:, -1:].argmax(-1)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize(prompt.device)
    seconds = time.perf_counter() - started
    return {
        "prompt_tokens": prompt.shape[1],
        "decode_tokens": new_tokens,
        "decode_tokens_per_second": new_tokens / seconds if seconds > 0 else None,
        "cache_bytes_after_prompt": after_prompt,
        "cache_bytes_after_decode": cache_bytes(cache),
    }
