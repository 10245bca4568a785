"""What a tokenizer costs and buys, measured on held-out text, and what its vocabulary costs a model.

Text metrics (`text_metrics`), all over the UTF-8 bytes of the original text:

- bytes per token: compression (higher: shorter sequences, more text per context window and per step);
- tokens per word: tokens / whitespace-separated words ("fertility"; whitespace-only tokens count too);
- split-word share: the share of words that two or more tokens overlap;
- unknown rate: bytes covered by `<unk>` tokens / all bytes (0 by construction for byte-level BPE and byte-fallback
  Unigram);
- Rényi efficiency, alpha = 2.5 (Zouhar et al. 2023, "Tokenization and the Noiseless Channel", eq. for eff_alpha):
  H_alpha(p) / log|V| with H_alpha(p) = log(sum_i p_i^alpha) / (1 - alpha), p the unigram distribution of the tokens on
  the text and |V| the vocabulary size (special tokens excluded). The paper divides by the vocabulary size; the
  authors' `tokenization-scorer` divides by the number of distinct tokens seen unless told the vocabulary, so pass
  `vocab_size=number seen` to reproduce its default. It penalises both very frequent and very rare tokens; 2.5 is the
  alpha that correlated best with BLEU in the paper;
- never-used tokens: learned tokens (beyond the special tokens and the alphabet: bytes, single characters and their
  WordPiece `##` forms) that the held-out text never uses;
- rarest-token frequency: the count, in the training split, of the token at the 5th percentile of learned-token
  frequencies (Gowda & May 2020 recommend the largest vocabulary at which 95% of tokens occur at least 100 times in the
  training data): exact with `token_counts_from_chunks`, or estimated from the held-out counts scaled by the ratio of
  training to held-out bytes (free, but coarse for counts below about 10 on the held-out text).

Model cost (`model_costs`): the input embedding plus the output layer's parameters for a target `XArchConfig` and
their share of the whole causal LM, counted on a model built on the meta device (no memory, any config); the closed
form `parameter_count_formula` is held against that count in the tests.
"""

from __future__ import annotations

import math
import re

import numpy as np
from tokenizers import Tokenizer

from .algorithms import BYTE_TOKENS, SPECIAL_TOKEN_LIST, UNK

WORD = re.compile(r"\S+")
RENYI_ALPHA = 2.5
RARE_PERCENTILE = 5.0


# ---- text metrics -----------------------------------------------------------------------------------------------------
def byte_offsets(text: str) -> np.ndarray:
    """`offsets[i]` = UTF-8 byte position of character i (length len(text) + 1): turns character spans into bytes."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate(([0], np.cumsum(widths)))


def tokens_per_word(text: str, spans: np.ndarray) -> np.ndarray:
    """For each whitespace-separated word of `text`, how many tokens overlap it; `spans` is (tokens, 2) character
    offsets [start, end). Vectorised: token t overlaps words lo..hi, added with a difference array."""
    words = np.array([match.span() for match in WORD.finditer(text)], dtype=np.int64).reshape(-1, 2)
    if not len(words) or not len(spans):
        return np.zeros(len(words), dtype=np.int64)
    starts, ends = spans[:, 0], spans[:, 1]
    lo = np.searchsorted(words[:, 1], starts, side="right")  # first word ending after the token starts
    hi = np.searchsorted(words[:, 0], ends, side="left") - 1  # last word starting before the token ends
    hits = (lo <= hi) & (ends > starts)
    difference = np.zeros(len(words) + 1, dtype=np.int64)
    np.add.at(difference, lo[hits], 1)
    np.add.at(difference, hi[hits] + 1, -1)
    return np.cumsum(difference)[:-1]


def tokens_per_word_reference(text: str, spans) -> list[int]:
    """Plain-loop reference for `tokens_per_word`."""
    counts = []
    for match in WORD.finditer(text):
        start, end = match.span()
        counts.append(sum(1 for a, b in spans if b > a and a < end and b > start))
    return counts


def renyi_entropy(counts, alpha: float = RENYI_ALPHA) -> float:
    """Rényi entropy in bits of the distribution the counts define (Shannon entropy at alpha = 1)."""
    counts = np.asarray(counts, dtype=np.float64)
    probabilities = counts[counts > 0] / counts.sum()
    if alpha == 1.0:
        return float(-(probabilities * np.log2(probabilities)).sum())
    return float(np.log2(np.sum(probabilities**alpha)) / (1.0 - alpha))


def renyi_efficiency(counts, vocab_size: int, alpha: float = RENYI_ALPHA) -> float:
    """Zouhar et al. (2023): H_alpha(p) / log2(vocab_size), in [0, 1]; 1 when all vocab_size tokens are equally used."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size}: Rényi efficiency needs at least 2 tokens")
    return renyi_entropy(counts, alpha) / math.log2(vocab_size)


def special_token_ids(tokenizer: Tokenizer) -> np.ndarray:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return np.array(sorted(vocab[token] for token in SPECIAL_TOKEN_LIST if token in vocab), dtype=np.int64)


def learned_token_mask(tokenizer: Tokenizer) -> np.ndarray:
    """True for the tokens learned from the text, False for the special tokens and the alphabet every algorithm
    starts from: byte tokens (BPE's 256 byte symbols, Unigram's `<0xNN>` fallback), single characters and, for
    WordPiece, their `##` forms. The never-used and rare-token statistics look at learned tokens only, so that an
    unused byte or a rare character (which every vocabulary must keep) does not count against a size."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    prefix = getattr(tokenizer.model, "continuing_subword_prefix", None) or ""
    base = set(SPECIAL_TOKEN_LIST) | set(BYTE_TOKENS)
    learned = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, index in vocab.items():
        stem = token.removeprefix(prefix)
        learned[index] = token not in base and len(stem) > 1
    return learned


# Unicode White_Space, as the tokenizers' regexes (Oniguruma) see it; Python's \s adds \x1c-\x1f
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CHUNK = re.compile(f"[{_WHITESPACE}]*[^{_WHITESPACE}]+|[{_WHITESPACE}]+")


def count_chunks(documents: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct chunks of the documents and how often each occurs. A chunk is a whitespace run and the
    non-whitespace run after it: every pre-tokenizer of the sweep splits where whitespace follows non-whitespace, and
    none of its patterns looks across that point, so a chunk tokenizes alone exactly as it does in context."""
    from collections import Counter

    counter: Counter = Counter()
    for document in documents:
        counter.update(_CHUNK.findall(document))
    chunks = list(counter)
    return chunks, np.fromiter((counter[chunk] for chunk in chunks), dtype=np.int64, count=len(chunks))


def token_counts_from_chunks(tokenizer: Tokenizer, chunks: list[str], weights: np.ndarray) -> np.ndarray:
    """How often each token occurs in the text `count_chunks` summarised: each distinct chunk is encoded once (about
    a third of the text on the default corpus), and the tests hold the result equal to encoding the whole text."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    encodings = tokenizer.encode_batch_fast(chunks, add_special_tokens=False)
    lengths = np.fromiter((len(encoding.ids) for encoding in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter((i for encoding in encodings for i in encoding.ids), dtype=np.int64, count=int(lengths.sum()))
    return np.bincount(ids, weights=np.repeat(weights, lengths), minlength=size).astype(np.int64)


def rare_token_count(counts: np.ndarray, learned: np.ndarray) -> float:
    """The count of the token at the 5th percentile of the learned tokens' counts (Gowda & May 2020's statistic)."""
    return float(np.percentile(counts[learned], RARE_PERCENTILE)) if learned.any() else 0.0


def text_metrics(
    tokenizer: Tokenizer,
    documents: list[str],
    training_bytes: int | None = None,
    training_counts: np.ndarray | None = None,
) -> dict:
    """The metrics of the module docstring for `tokenizer` on `documents` (encoded without special tokens), plus
    the raw totals they come from. The rarest-token count comes from `training_counts` (exact, see
    `token_counts_from_chunks`) when given, else from the documents' counts rescaled by `training_bytes`."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    unk_id = tokenizer.token_to_id(UNK)
    counts = np.zeros(size, dtype=np.int64)
    total_bytes = total_tokens = total_words = split_words = unk_bytes = 0
    for text, encoding in zip(documents, tokenizer.encode_batch(documents, add_special_tokens=False)):
        ids = np.asarray(encoding.ids, dtype=np.int64)
        spans = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        positions = byte_offsets(text)
        total_bytes += int(positions[-1])
        total_tokens += len(ids)
        counts += np.bincount(ids, minlength=size)
        per_word = tokens_per_word(text, spans)
        total_words += len(per_word)
        split_words += int((per_word >= 2).sum())
        if unk_id is not None and len(ids):
            unknown = spans[ids == unk_id]
            unk_bytes += int((positions[unknown[:, 1]] - positions[unknown[:, 0]]).sum())
    if total_tokens == 0:
        raise ValueError("the evaluation text holds no tokens: it is empty")
    special = special_token_ids(tokenizer)
    learned = learned_token_mask(tokenizer)
    if training_counts is not None:
        rare, source = rare_token_count(training_counts, learned), "training split (exact)"
    else:
        scale = (training_bytes / total_bytes) if training_bytes else 1.0
        rare, source = rare_token_count(counts, learned) * scale, "held-out counts x train/held-out bytes (estimate)"
    return {
        "bytes": total_bytes,
        "tokens": total_tokens,
        "words": total_words,
        "bytes_per_token": total_bytes / total_tokens,
        "tokens_per_word": total_tokens / max(total_words, 1),
        "split_word_share": split_words / max(total_words, 1),
        "unk_per_byte": unk_bytes / max(total_bytes, 1),
        "renyi_efficiency": renyi_efficiency(np.delete(counts, special), max(size - len(special), 2)),
        "learned_tokens": int(learned.sum()),
        "unused_tokens": int((counts[learned] == 0).sum()),
        "unused_share": float((counts[learned] == 0).mean()) if learned.any() else 0.0,
        "rare_token_count": rare,
        "rare_token_source": source,
    }


# ---- model cost -------------------------------------------------------------------------------------------------------
def target_config(overrides: dict | None, vocab_size: int):
    """A causal-LM `XArchConfig` of the given vocabulary size from `overrides` (any XArchConfig field)."""
    from hf_xarch import XArchConfig

    values = dict(overrides or {})
    values.update(vocab_size=int(vocab_size), is_decoder=True)
    return XArchConfig(**values)


def _meta_model(config):
    import torch

    from hf_xarch import XArchForCausalLM

    with torch.device("meta"):
        return XArchForCausalLM(config)


def count_parameters(config) -> int:
    """Parameters of `XArchForCausalLM(config)`, shared (tied) ones once, counted on the meta device."""
    return sum(parameter.numel() for parameter in _meta_model(config).parameters())


def model_costs(config) -> dict:
    """Input-embedding and output-layer parameters (tied ones once) of the causal LM, the whole model's, and the
    share. The projection a factorized embedding adds (E x H) does not grow with the vocabulary, so it is not counted."""
    model = _meta_model(config)
    vocabulary = {id(p): p.numel() for module in (model.get_input_embeddings(), model.lm_head) for p in module.parameters()}
    total = sum(parameter.numel() for parameter in model.parameters())
    embedding = sum(vocabulary.values())
    return {"embedding_params": embedding, "total_params": total, "embedding_share": embedding / total}


def _norm_parameters(config, dim: int) -> int:
    return dim if config.norm_type == "rmsnorm" else 2 * dim


def embedding_parameter_formula(config) -> int:
    """V x E for the input table, and V x E more for an untied full output layer."""
    if getattr(config, "output_layer", "full") != "full":
        raise ValueError(f"output_layer={config.output_layer!r}: the closed form covers the full output layer only")
    return config.vocab_size * config.embedding_size * (1 if config.tie_word_embeddings else 2)


def parameter_count_formula(config) -> int:
    """Closed-form parameter count of `XArchForCausalLM(config)` for full attention and the full output layer."""
    hidden, embed, heads = config.hidden_size, config.embedding_size, config.num_attention_heads
    head_dim, kv_heads, inner = config.head_dim, config.num_key_value_heads, config.intermediate_size
    embeddings = config.vocab_size * embed + config.type_vocab_size * embed
    if config.position_embedding_type == "learned":
        embeddings += config.max_position_embeddings * embed
    elif config.position_embedding_type == "sinusoidal":
        embeddings += 1  # the table's learned scale
    if config.embedding_norm:
        embeddings += _norm_parameters(config, embed)
    if embed != hidden:
        embeddings += embed * hidden + hidden  # projection E -> H (with bias); the LM head projects back without
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o and k, v
    attention += (heads * head_dim + 2 * kv_heads * head_dim) * bool(config.qkv_bias)  # q, k, v biases
    attention += hidden * bool(config.attention_bias)  # o bias
    matrices = 3 if config.mlp_type == "gated" else 2
    mlp = matrices * hidden * inner + (1 if config.mlp_bias else 0) * ((matrices - 1) * inner + hidden)
    block = attention + mlp + 2 * _norm_parameters(config, hidden)
    schedule = config.block_schedule() if hasattr(config, "block_schedule") else range(config.num_hidden_layers)
    total = embeddings + len(set(schedule)) * block
    total += _norm_parameters(config, hidden) if config.final_norm else 0
    total += hidden * embed if embed != hidden else 0
    total += 0 if config.tie_word_embeddings else config.vocab_size * embed
    return total


__all__ = [
    "RENYI_ALPHA",
    "byte_offsets",
    "count_chunks",
    "count_parameters",
    "embedding_parameter_formula",
    "learned_token_mask",
    "model_costs",
    "parameter_count_formula",
    "rare_token_count",
    "renyi_efficiency",
    "renyi_entropy",
    "special_token_ids",
    "target_config",
    "text_metrics",
    "token_counts_from_chunks",
    "tokens_per_word",
    "tokens_per_word_reference",
]
