"""The three tokenizer algorithms of the sweep, trained with `tokenizers` and saved for `AutoTokenizer`.

| name        | model (paper)                                  | pre-tokenization                           | unknown text |
|-------------|------------------------------------------------|--------------------------------------------|--------------|
| `bpe`       | byte-level BPE (Sennrich et al. 2016; GPT-2)   | GPT-2's regex, then bytes as characters    | none (bytes) |
| `wordpiece` | WordPiece, `##` continuations (Wu et al. 2016) | whitespace runs, `\\w+` runs, other chars  | `<unk>`      |
| `unigram`   | Unigram LM (Kudo 2018) with byte fallback      | GPT-2's regex                              | none (bytes) |

All three are lossless: `decode(encode(text)) == text` (for WordPiece, when no `<unk>` was produced). BERT's WordPiece
drops whitespace; ours keeps each whitespace run as its own piece, so that its bytes per token and bits per byte count
the same information as the other two. Isolating every punctuation character (as BERT does) keeps `##` unambiguous,
so the decoder simply deletes the continuation prefix. Every tokenizer has the same four special tokens
(`SPECIAL_TOKENS`); `<unk>` is never produced by `bpe` and `unigram`.

Sizes count every token: special tokens, the 256 byte tokens of `bpe` (its alphabet) and of `unigram` (its fallback),
and WordPiece's characters with their `##` forms.

Byte-level BPE adds tokens greedily, one merge at a time, in an order that does not depend on the target size and with
ties broken by token ids that are themselves deterministic (the byte alphabet is sorted), so a vocabulary of N tokens
is the first N of any larger one: `train_merge_prefix` trains once at the largest size and cuts
(`truncate_vocabulary`); the tests hold that against training each size directly (`train_tokenizer`). WordPiece is
trained by `tokenizers` as BPE too, but it numbers the `##` forms in hash-map order, so merges of equal counts tie-break
differently from run to run (two trainings at one size differ in a few rare tokens): it is trained per size, as is
Unigram, which prunes from a large seed vocabulary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
SPECIAL_TOKEN_LIST = list(SPECIAL_TOKENS.values())
UNK = SPECIAL_TOKENS["unk_token"]

ALGORITHMS = {
    "bpe": "byte-level BPE (Sennrich et al. 2016, Radford et al. 2019)",
    "wordpiece": "WordPiece (Schuster & Nakajima 2012, Wu et al. 2016), whitespace kept",
    "unigram": "Unigram LM (Kudo 2018) with byte fallback",
}
MERGE_PREFIX_ALGORITHMS = ("bpe",)

# GPT-2's pre-tokenization pattern (contractions, letters, digits, other symbols, each with an optional leading space;
# whitespace runs keep their last space for the next word); ByteLevel splits with it too, then maps bytes to chars
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WORDPIECE_PATTERN = r"\s+|\w+|[^\w\s]"
BYTE_TOKENS = [f"<0x{value:02X}>" for value in range(256)]


def check_algorithms(names) -> list[str]:
    """Normalise a list (or comma-separated string) of algorithm names; raise ValueError naming unknown ones."""
    if isinstance(names, str):
        names = names.split(",")
    names = [str(name).strip().lower() for name in names if str(name).strip()]
    unknown = [name for name in names if name not in ALGORITHMS]
    if unknown:
        raise ValueError(f"algorithms={unknown} are not known; allowed: {', '.join(ALGORITHMS)}")
    if not names:
        raise ValueError(f"algorithms is empty; give one or more of: {', '.join(ALGORITHMS)}")
    return list(dict.fromkeys(names))


def minimum_vocab_size(algorithm: str) -> int:
    """The smallest size an algorithm can have before it sees any text: special tokens plus its byte tokens
    (WordPiece also needs its alphabet, which depends on the text: `wordpiece_base_size`)."""
    base = {"bpe": 256, "unigram": 256 + 1, "wordpiece": 1}[algorithm]
    return len(SPECIAL_TOKEN_LIST) + base


def new_tokenizer(algorithm: str) -> Tokenizer:
    """An untrained tokenizer with the algorithm's model, pre-tokenizer and decoder."""
    if algorithm == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
    elif algorithm == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(WORDPIECE_PATTERN), behavior="isolated")
        # tokens join without separators; "##" can only open a continuation, as "#" is always a piece of its own
        tokenizer.decoder = decoders.Replace(Regex("^##"), "")
    elif algorithm == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated")
        tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    else:
        check_algorithms([algorithm])
        raise AssertionError("unreachable")
    return tokenizer


def _trainer(algorithm: str, vocab_size: int, limit_alphabet: int | None, alphabet_size: int = 0):
    if algorithm == "bpe":
        return trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKEN_LIST,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    if algorithm == "wordpiece":
        options = {} if limit_alphabet is None else {"limit_alphabet": limit_alphabet}
        return trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKEN_LIST,
            continuing_subword_prefix="##",
            show_progress=False,
            **options,
        )
    # the 256 byte tokens are added after training (`add_byte_fallback`), so the trainer aims at the rest; it keeps
    # every character of the text and refuses a size below that, so it may aim higher (and be trimmed afterwards)
    return trainers.UnigramTrainer(
        vocab_size=max(vocab_size - len(BYTE_TOKENS), alphabet_size + len(SPECIAL_TOKEN_LIST) + 1),
        special_tokens=SPECIAL_TOKEN_LIST,
        unk_token=UNK,
        show_progress=False,
    )


def train_tokenizer(
    algorithm: str, documents: list[str], vocab_size: int, limit_alphabet: int | None = None
) -> Tokenizer:
    """Train one tokenizer aiming at `vocab_size` tokens (the reference path: one training per size).

    The result may hold fewer tokens when the text runs out of merges or pieces (`vocab_size(tokenizer)` tells).
    `limit_alphabet` (WordPiece only) keeps that many of the most frequent characters; the rest become `<unk>`.
    """
    if vocab_size < minimum_vocab_size(algorithm):
        raise ValueError(
            f"vocab_size={vocab_size} is below what {algorithm} needs: at least {minimum_vocab_size(algorithm)} "
            f"({len(SPECIAL_TOKEN_LIST)} special tokens" + (" + 256 byte tokens)" if algorithm != "wordpiece" else ")")
        )
    tokenizer = new_tokenizer(algorithm)
    alphabet_size = len(set().union(*map(set, documents))) if algorithm == "unigram" else 0
    trainer = _trainer(algorithm, vocab_size, limit_alphabet, alphabet_size)
    tokenizer.train_from_iterator(documents, trainer, length=len(documents))
    if algorithm == "unigram":
        tokenizer = add_byte_fallback(tokenizer, vocab_size)
    if algorithm == "wordpiece" and wordpiece_base_size(tokenizer) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is below the {wordpiece_base_size(tokenizer)} tokens wordpiece starts from on this "
            f"corpus (special tokens, characters and their '##' forms; limit_alphabet={limit_alphabet}): use a larger "
            "size or a smaller limit_alphabet"
        )
    return tokenizer


def add_byte_fallback(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """Give a trained Unigram tokenizer the 256 byte tokens `<0x00>`..`<0xFF>` and turn byte fallback on, as
    SentencePiece does: a character no piece covers is spelled as its UTF-8 bytes instead of `<unk>`.

    `tokenizers`' trainer keeps every character of the text as a piece; when those push the total over `vocab_size`
    (small sizes, or text with many distinct characters), the lowest-scoring pieces go, without another round of EM:
    the trainer scores the characters it must keep below every piece it chose, so the rarest characters go first and
    fall back to bytes, as SentencePiece's `character_coverage` < 1 makes them.
    """
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    pieces = model["vocab"]
    specials = [piece for piece in pieces if piece[0] in SPECIAL_TOKEN_LIST]
    others = [piece for piece in pieces if piece[0] not in SPECIAL_TOKEN_LIST and piece[0] not in BYTE_TOKENS]
    room = max(vocab_size - len(specials) - len(BYTE_TOKENS), 0)
    if len(others) > room:
        keep = {id(piece) for piece in sorted(others, key=lambda piece: -piece[1])[:room]}
        others = [piece for piece in others if id(piece) in keep]
    lowest = min((score for _, score in others), default=0.0)
    # scores below every real piece: a byte token only wins where nothing else matches (the literal text "<0x41>")
    pieces = specials + others + [[token, lowest - 1.0] for token in BYTE_TOKENS]
    model["vocab"] = pieces
    model["unk_id"] = next(index for index, (token, _) in enumerate(pieces) if token == UNK)
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(data))


def vocab_size(tokenizer: Tokenizer) -> int:
    return tokenizer.get_vocab_size(with_added_tokens=True)


def wordpiece_base_size(tokenizer: Tokenizer) -> int:
    """Tokens a WordPiece vocabulary holds before its first merge: special tokens, characters and their `##` forms."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return sum(
        1 for token in vocab if token in SPECIAL_TOKEN_LIST or len(token) == 1 or (token.startswith("##") and len(token) == 3)
    )


def truncate_vocabulary(tokenizer: Tokenizer, size: int) -> Tokenizer:
    """The first `size` tokens of a BPE or WordPiece tokenizer (by id, i.e. in the order training added them), with
    the merges that build them: the tokenizer that training directly to `size` gives."""
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    vocab = {token: index for token, index in model["vocab"].items() if index < size}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("truncate_vocabulary needs contiguous token ids 0..N-1, as tokenizers' trainers assign them")
    model["vocab"] = vocab
    if model["type"] == "BPE":
        kept = []
        for merge in model["merges"]:
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            if left + right in vocab:
                kept.append(merge)
        model["merges"] = kept
    return Tokenizer.from_str(json.dumps(data))


@dataclass
class TrainedTokenizer:
    """One tokenizer of the sweep and how it was made."""

    algorithm: str
    requested_size: int
    tokenizer: Tokenizer
    train_seconds: float
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.tokenizer)

    @property
    def reached(self) -> bool:
        return self.vocab_size >= self.requested_size

    @property
    def name(self) -> str:
        return f"{self.algorithm}-{self.requested_size}"


def train_merge_prefix(algorithm: str, documents: list[str], sizes: list[int]) -> list[TrainedTokenizer]:
    """Byte-level BPE at every size in `sizes` from one training at the largest (see the module docstring)."""
    if algorithm not in MERGE_PREFIX_ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: only {MERGE_PREFIX_ALGORITHMS} grow by merges; train it per size")
    start = time.perf_counter()
    largest = train_tokenizer(algorithm, documents, max(sizes))
    seconds = time.perf_counter() - start
    results = []
    for size in sorted(sizes):
        tokenizer = largest if size >= vocab_size(largest) else truncate_vocabulary(largest, size)
        note = f"first {size} tokens of one training at {max(sizes)}" if size != max(sizes) else ""
        results.append(TrainedTokenizer(algorithm, size, tokenizer, seconds, note))
    return results


def to_transformers(tokenizer: Tokenizer, model_max_length: int | None = None):
    """A `PreTrainedTokenizerFast` around `tokenizer` with the sweep's special tokens (nothing added by default:
    no BOS/EOS post-processor, so `tok(text)` gives exactly the text's tokens)."""
    from transformers import PreTrainedTokenizerFast

    kwargs = dict(SPECIAL_TOKENS)
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Save so that `AutoTokenizer.from_pretrained(folder)` loads it (tokenizer.json + tokenizer_config.json)."""
    folder = Path(folder)
    to_transformers(tokenizer).save_pretrained(str(folder))
    return folder


__all__ = [
    "ALGORITHMS",
    "SPECIAL_TOKENS",
    "TrainedTokenizer",
    "add_byte_fallback",
    "check_algorithms",
    "minimum_vocab_size",
    "new_tokenizer",
    "save_tokenizer",
    "to_transformers",
    "train_merge_prefix",
    "train_tokenizer",
    "truncate_vocabulary",
    "vocab_size",
]
