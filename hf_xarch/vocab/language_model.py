"""The quality step of the sweep: a small XArch causal LM per tokenizer, at equal compute, scored in bits per byte.

Per-token loss and perplexity are not comparable across vocabularies: a tokenizer with longer tokens makes fewer,
harder predictions. Bits per byte divides the total information the model needs for the text by the text's size:

    bits per byte = (sum over the held-out tokens of -ln p(token | context)) / ln 2 / (UTF-8 bytes of the text)

so a tokenizer is rewarded for compression only as far as the model can still predict its tokens.

Equal compute, precisely: every tokenizer's model has the same body (`lm` config: layers, width, heads, MLP) and is
trained for the same number of optimizer steps on batches of the same size and length *in tokens*, from the same
training split, with the same optimizer, schedule and seed. So each processes the same number of tokens, and the
transformer body does the same work (about 6 x body parameters FLOPs per token); what differs is the output layer
(6 x V x E FLOPs per token, reported as `lm_train_flops`) and how many bytes of text those tokens hold (reported as
`lm_train_bytes`): a tokenizer that compresses better sees more text for the same compute, which is the point of
compressing. Evaluation cuts the held-out stream into windows of the same number of tokens (each token predicted once,
with up to `seq_len - 1` tokens of context).

Caveat: `<unk>` (WordPiece, on characters it never saw) is one easy-to-predict token for unknown text, so bits per byte
is optimistic for a tokenizer with a non-zero unknown rate; the table shows the rate beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .algorithms import SPECIAL_TOKENS

DEFAULT_LM = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "position_embedding_type": "rope",
    "tie_word_embeddings": True,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}


@dataclass
class LMSettings:
    """How each tokenizer's model is trained and evaluated (see the module docstring for "equal compute")."""

    steps: int
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    eval_bytes: int = 200_000
    seed: int = 0
    model: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} is not allowed: a positive integer")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} is not allowed: at least 2 (a token and its successor)")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate!r} is not allowed: a positive number")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction={self.warmup_fraction!r} is not allowed: a number in [0, 1)")

    def config(self, tokenizer):
        """The small LM's `XArchConfig` for `tokenizer` (its vocabulary size and special-token ids)."""
        from hf_xarch import XArchConfig

        values = dict(DEFAULT_LM, max_position_embeddings=self.seq_len)
        values.update(self.model)
        ids = {name: tokenizer.token_to_id(SPECIAL_TOKENS[name]) for name in ("pad_token", "bos_token", "eos_token")}
        values.update(
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
            is_decoder=True,
            pad_token_id=ids["pad_token"],
            bos_token_id=ids["bos_token"],
            eos_token_id=ids["eos_token"],
        )
        return XArchConfig(**values)


def token_stream(tokenizer, documents: list[str]) -> np.ndarray:
    """All documents' tokens in one array, each document after an end-of-sequence token (the separator the model
    learns to predict documents after)."""
    eos = tokenizer.token_to_id(SPECIAL_TOKENS["eos_token"])
    pieces = []
    for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
        pieces.append(np.array([eos], dtype=np.int64))
        pieces.append(np.asarray(encoding.ids, dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def evaluation_text(documents: list[str], max_bytes: int) -> list[str]:
    """The held-out documents in order, up to `max_bytes` UTF-8 bytes (the last cut at a line boundary): the same
    text for every tokenizer."""
    chosen, used = [], 0
    for document in documents:
        size = len(document.encode("utf-8"))
        if used + size > max_bytes:
            head = document.encode("utf-8")[: max_bytes - used].decode("utf-8", errors="ignore")
            head = head[: head.rfind("\n") + 1] if "\n" in head else head
            if head:
                chosen.append(head)
            break
        chosen.append(document)
        used += size
    return chosen


def _schedule(step: int, settings: LMSettings) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    warmup = max(1, int(settings.warmup_fraction * settings.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_language_model(tokenizer, train_documents: list[str], settings: LMSettings, device="cpu", progress=None):
    """Train a fresh `XArchForCausalLM` on random windows of the training stream; returns (model, stats)."""
    import torch

    from hf_xarch import XArchForCausalLM

    stream = token_stream(tokenizer, train_documents)
    if len(stream) < settings.seq_len + 1:
        raise ValueError(
            f"the training split holds {len(stream)} tokens, fewer than one window of seq_len={settings.seq_len}: "
            "use a larger corpus or a shorter seq_len"
        )
    torch.manual_seed(settings.seed)
    model = XArchForCausalLM(settings.config(tokenizer)).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95), weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, settings))
    generator = np.random.default_rng(settings.seed)
    stream_tensor = torch.from_numpy(stream)
    offsets = torch.arange(settings.seq_len)
    start = time.perf_counter()
    losses = []
    for _ in range(settings.steps):
        starts = torch.from_numpy(generator.integers(0, len(stream) - settings.seq_len, size=settings.batch_size))
        batch = stream_tensor[starts[:, None] + offsets].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    tokens = settings.steps * settings.batch_size * settings.seq_len
    train_bytes_per_token = sum(len(d.encode("utf-8")) for d in train_documents) / max(len(stream), 1)
    embed = model.config.embedding_size
    body = sum(p.numel() for p in model.parameters()) - model.config.vocab_size * embed * (
        1 if model.config.tie_word_embeddings else 2
    )
    stats = {
        "lm_params": sum(p.numel() for p in model.parameters()),
        "lm_train_tokens": tokens,
        "lm_train_bytes": round(tokens * train_bytes_per_token),
        "lm_train_epochs": tokens / len(stream),
        # Kaplan et al. 2020: C ~ 6 N per token; N = body + the output layer's V x E (the input lookup is free)
        "lm_train_flops": 6.0 * tokens * (body + model.config.vocab_size * embed),
        "lm_final_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "lm_train_seconds": time.perf_counter() - start,
    }
    return model, stats


def heldout_bits_per_byte(model, tokenizer, documents: list[str], seq_len: int, batch_size: int = 16, device="cpu"):
    """Total negative log-likelihood of the documents' tokens (nats), in bits per UTF-8 byte of the documents.

    The stream (each document after an end-of-sequence token) is cut into windows of `seq_len` tokens overlapping by
    one, so every token but the first is predicted exactly once; the end-of-sequence targets are left out, as they
    are not part of the text whose bytes we divide by."""
    import torch

    stream = token_stream(tokenizer, documents)
    text_bytes = sum(len(document.encode("utf-8")) for document in documents)
    if text_bytes == 0 or len(stream) < 2:
        raise ValueError("the held-out text is empty: nothing to score")
    eos = tokenizer.token_to_id(SPECIAL_TOKENS["eos_token"])
    stride = seq_len - 1
    windows = [stream[i : i + seq_len] for i in range(0, len(stream) - 1, stride)]
    total_nats, scored = 0.0, 0
    model.eval()
    with torch.no_grad():
        for first in range(0, len(windows), batch_size):
            chunk = windows[first : first + batch_size]
            width = max(len(window) for window in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            targets = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, window in enumerate(chunk):
                ids[row, : len(window)] = torch.from_numpy(window)
                targets[row, : len(window)] = torch.from_numpy(np.where(window == eos, -100, window))
            ids, targets = ids.to(device), targets.to(device)
            # right padding only: a causal model's outputs at real positions never see it
            logits = model(input_ids=ids).logits[:, :-1].float()
            labels = targets[:, 1:]
            nats = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_nats += float(nats)
            scored += int((labels != -100).sum())
    return {
        "bits_per_byte": total_nats / math.log(2) / text_bytes,
        "heldout_nats": total_nats,
        "heldout_scored_tokens": scored,
        "heldout_bytes": text_bytes,
    }


def bits_per_byte(tokenizer, train_documents, heldout_documents, settings: LMSettings, device="cpu", progress=None):
    """Train the small LM for `tokenizer` and score the held-out text (at most `settings.eval_bytes`)."""
    model, stats = train_language_model(tokenizer, train_documents, settings, device, progress)
    text = evaluation_text(heldout_documents, settings.eval_bytes)
    stats.update(heldout_bits_per_byte(model, tokenizer, text, settings.seq_len, settings.batch_size, device))
    return stats


__all__ = [
    "DEFAULT_LM",
    "LMSettings",
    "bits_per_byte",
    "evaluation_text",
    "heldout_bits_per_byte",
    "token_stream",
    "train_language_model",
]
