"""Where the sweep's text comes from: the default corpus, local files, or a Hub dataset (online only).

`load_documents(["default"])` is the default corpus of `hf_xarch.train.corpus` (one document per standard-library
file). Local files and folders are read as UTF-8 (folders: their .txt/.md/.rst/.py files, recursively, sorted;
.jsonl: the `text_column` of each record) and cut into documents at line boundaries, so that a single big file can
still be split into training and held-out parts. Anything else is taken as a Hub dataset name, ``name`` or
``name:config``, streamed until `max_bytes`.
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_xarch.train.corpus import load_default_corpus

FOLDER_SUFFIXES = (".txt", ".md", ".rst", ".py")
MIN_CORPUS_BYTES = 2048
MAX_DOCUMENT_BYTES = 65536


def chunk_text(text: str, max_bytes: int) -> list[str]:
    """`text` cut at line boundaries into pieces of at most `max_bytes` UTF-8 bytes (a longer line is its own piece)."""
    pieces, current, used = [], [], 0
    for line in text.splitlines(keepends=True):
        size = len(line.encode("utf-8"))
        if current and used + size > max_bytes:
            pieces.append("".join(current))
            current, used = [], 0
        current.append(line)
        used += size
    if current:
        pieces.append("".join(current))
    return [piece for piece in pieces if piece.strip()]


def _read_file(path: Path, text_column: str) -> list[str]:
    try:
        if path.suffix == ".jsonl":
            texts = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if text_column not in record:
                        raise ValueError(f"{path}:{number} has no field {text_column!r} (text_column)")
                    texts.append(str(record[text_column]))
            return texts
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus file {path} is not UTF-8 text ({error})") from None


def _local_texts(paths: list[Path], text_column: str) -> list[str]:
    texts = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES + (".jsonl",)) \
            if path.is_dir() else [path]
        for file in files:
            texts += _read_file(file, text_column)
    return texts


def _hub_texts(spec: str, split: str, text_column: str, max_bytes: int | None) -> list[str]:
    name, _, config = spec.partition(":")
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, config or None, split=split, streaming=True)
        texts, used = [], 0
        for record in dataset:
            if text_column not in record:
                raise ValueError(f"Hub dataset {spec!r} has no column {text_column!r} (text_column); "
                                 f"it has {sorted(record)}")
            texts.append(str(record[text_column]))
            used += len(texts[-1].encode("utf-8"))
            if max_bytes is not None and used >= max_bytes:
                break
        return texts
    except ValueError:
        raise
    except Exception as error:  # offline, unknown name, gated...: say what was tried
        raise ValueError(
            f"corpus={spec!r} is not 'default', not an existing local path, and could not be loaded as a Hub dataset "
            f"(split={split!r}): {type(error).__name__}: {error}"
        ) from None


def _cap(texts: list[str], max_bytes: int | None) -> list[str]:
    if max_bytes is None:
        return texts
    kept, used = [], 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if used + size > max_bytes:
            head = text.encode("utf-8")[: max_bytes - used].decode("utf-8", errors="ignore")
            if head.strip():
                kept.append(head)
            break
        kept.append(text)
        used += size
    return kept


def load_documents(
    sources: list[str],
    max_bytes: int | None = None,
    seed: int = 0,
    text_column: str = "text",
    split: str = "train",
    for_training: bool = True,
) -> tuple[list[str], str]:
    """(documents, a one-line description) from `sources` (see the module docstring), at most `max_bytes` in all.
    Raises ValueError for an empty corpus, and, `for_training`, for one too small to split (under `MIN_CORPUS_BYTES`
    or a single document); evaluation-only text (out of domain) may be short."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ValueError("corpus: no source given; use 'default', local paths, or a Hub dataset name")
    documents, described = [], []
    for source in sources:
        if source == "default":
            documents += load_default_corpus(max_bytes=max_bytes, seed=seed)
            described.append("the default corpus (Python standard library code and docs)")
        elif Path(source).exists():
            texts = _cap(_local_texts([Path(source)], text_column), max_bytes)
            limit = max(1024, min(MAX_DOCUMENT_BYTES, sum(len(t.encode("utf-8")) for t in texts) // 20))
            documents += [piece for text in texts for piece in chunk_text(text, limit)]
            described.append(f"local {source}")
        else:
            documents += _hub_texts(source, split, text_column, max_bytes)
            described.append(f"Hub dataset {source} ({split})")
    documents = _cap([document for document in documents if document.strip()], max_bytes)
    total = sum(len(document.encode("utf-8")) for document in documents)
    if total == 0:
        raise ValueError(f"corpus {sources} is empty: no text to train tokenizers on")
    if for_training and (total < MIN_CORPUS_BYTES or len(documents) < 2):
        raise ValueError(
            f"corpus {sources} is too small: {total} bytes in {len(documents)} document(s); the sweep needs at least "
            f"{MIN_CORPUS_BYTES} bytes in 2 or more documents (one part to train on, one to hold out)"
        )
    return documents, "; ".join(described) + f", {total:,} bytes"


__all__ = ["MIN_CORPUS_BYTES", "chunk_text", "load_documents"]
