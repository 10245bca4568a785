"""Tokenizers for the recipes: load one from a path, or train one on the fly with 🤗 ``tokenizers``.

Trained tokenizers share one special-token layout, so the ids the model config needs are the same every time:
``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2 (BOS / CLS), ``</s>`` 3 (EOS / SEP), ``<mask>`` 4 (RoBERTa's names).
Causal LMs get Llama's template (``<s> text``: generation continues the text), everything else RoBERTa's
(``<s> text </s>``: a bidirectional model pools ``<s>`` and sees where the text ends).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
ALGORITHMS = ("bpe", "unigram", "wordpiece")


def _limited(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Yield texts until about `max_bytes` UTF-8 bytes have gone by (None: all of them)."""
    seen = 0
    for text in texts:
        yield text
        seen += len(text.encode("utf-8"))
        if max_bytes is not None and seen >= max_bytes:
            return


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    algorithm: str = "bpe",
    min_frequency: int = 2,
    causal: bool = True,
    max_bytes: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts` (at most `max_bytes` of them) and wrap it for transformers.

    `bpe` is GPT-2's byte-level BPE (no unknown tokens, reversible on any text), `unigram` is SentencePiece's
    unigram LM over Metaspace pieces (T5, ALBERT), `wordpiece` is BERT's. Training is deterministic for a given input.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if algorithm not in ALGORITHMS:
        raise ValueError(f"tokenizer.algorithm={algorithm!r} is not allowed: one of {list(ALGORITHMS)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"tokenizer.vocab_size={vocab_size!r} is not allowed: an integer > {len(SPECIAL_TOKENS)}")
    if algorithm == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so nothing is ever unknown
            show_progress=False,
        )
    elif algorithm == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", show_progress=False
        )
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
    tokenizer.train_from_iterator(_limited(texts, max_bytes), trainer)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise ValueError("the tokenizer learned no tokens: the training text is empty")
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    if causal:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
        )
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
    )


# what a folder needs for AutoTokenizer: a fast tokenizer's file, or a tokenizer config naming a class and its vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_tokenizer_folder(path: str | Path, key: str = "tokenizer.path") -> None:
    """Fail with a message naming the folder when it holds no saved tokenizer (`key`: the setting that named it)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{key}={str(path)!r}: no such folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{key}={str(path)!r} holds no tokenizer (neither {' nor '.join(TOKENIZER_FILES)}): save one there with "
            "tokenizer.save_pretrained(folder), or name one with tokenizer.path=..."
        )


def load_tokenizer(path: str | Path, key: str = "tokenizer.path") -> PreTrainedTokenizerFast:
    """A saved tokenizer: a folder (``save_pretrained``) or a ``tokenizer.json`` file (`key`: the setting that named
    it, for the error message)."""
    path = Path(path)
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    if not path.is_dir():
        raise ValueError(f"{key}={str(path)!r}: no such file or folder")
    check_tokenizer_folder(path, key)
    return AutoTokenizer.from_pretrained(str(path))


def check_tokenizer_for_task(tokenizer, task: str) -> None:
    """Fail before training when a tokenizer lacks a token the task needs."""
    needed = {"pad_token": "padding batches"}
    if task == "mlm":
        needed["mask_token"] = "masked language modelling"
    if task == "clm":
        needed["eos_token"] = "separating packed documents"
    if task == "seq2seq":
        needed["eos_token"] = "ending targets (generation stops there)"
    for attribute, why in needed.items():
        if getattr(tokenizer, attribute, None) is None:
            raise ValueError(f"the tokenizer has no {attribute}, which {task!r} needs for {why}")
