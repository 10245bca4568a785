"""The default corpus: prose and code from the running Python's standard library, offline and on every machine.

What it holds (CPython 3.11 on Linux: about 750 files, 12 MB):

- every ``.py`` source of the standard library, docstrings and comments included (code and English prose mixed, as
  in most code corpora; ``pydoc_data/topics.py`` alone is 0.75 MB of the language reference's prose);
- every ``.txt`` and ``.rst`` document that ships beside it (IDLE's help, NEWS and credits, lib2to3's grammars,
  ``email/architecture.rst``, ``LICENSE.txt``...).

What it leaves out, and why:

- ``site-packages``/``dist-packages``: third-party code that differs from machine to machine;
- the test suites (``test``, ``tests``, ``idle_test`` folders): 20 MB that distributions often strip (so the corpus
  would change with the packaging), full of files that are deliberately mis-encoded or syntactically broken;
- ``__pycache__``, and any file that is not valid UTF-8, contains NUL bytes, or is empty.

One document per file. The order is a seeded, platform-independent shuffle (SHA-1 of ``seed`` and the path relative
to the standard library root), so any prefix (``max_bytes``) is a varied sample rather than the alphabetically first
modules, and the same ``seed`` gives the same documents on every run and machine with the same Python.

API (stable; the training recipes and the vocabulary sweep share it):
``stdlib_root()``, ``default_corpus_files(max_bytes, seed)``, ``load_default_corpus(max_bytes, seed)``,
``train_heldout_split(documents, heldout_fraction, seed)``, ``corpus_bytes(documents)``.
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

TEXT_SUFFIXES = (".py", ".txt", ".rst")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> Path:
    """The folder of the running Python's pure-Python standard library (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _candidate_files(root: Path) -> list[Path]:
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in EXCLUDED_DIRS)
        found += [Path(folder) / name for name in sorted(names) if name.endswith(TEXT_SUFFIXES)]
    return found


def _ordered_files(seed: int) -> list[Path]:
    root = stdlib_root()

    def key(path: Path) -> str:
        # hashlib, not hash(): str hashes are salted per process, and the order must survive restarts
        return hashlib.sha1(f"{seed}:{path.relative_to(root).as_posix()}".encode()).hexdigest()

    return sorted(_candidate_files(root), key=key)


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.strip() or "\x00" in text:
        return None
    return text


def _truncate_to_bytes(text: str, budget: int) -> str:
    """The longest prefix of whole lines of `text` that fits in `budget` UTF-8 bytes (a partial line if no line fits)."""
    head = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    cut = head.rfind("\n")
    return head[: cut + 1] if cut >= 0 else head


def _iter_default_documents(max_bytes: int | None, seed: int) -> Iterator[tuple[Path, str]]:
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"max_bytes={max_bytes!r} is not allowed: a positive number of bytes, or None for all")
    used = 0
    for path in _ordered_files(seed):
        text = _read_text(path)
        if text is None:
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and used + size > max_bytes:
            text = _truncate_to_bytes(text, max_bytes - used)
            if text:
                yield path, text
            return
        used += size
        yield path, text


def default_corpus_files(max_bytes: int | None = None, seed: int = 0) -> list[Path]:
    """The files of the default corpus in their seeded order; with `max_bytes`, those that `load_default_corpus`
    reads for that budget (the last one possibly only in part)."""
    return [path for path, _ in _iter_default_documents(max_bytes, seed)]


def load_default_corpus(max_bytes: int | None = None, seed: int = 0) -> list[str]:
    """The default corpus as documents (one per file, in the seeded order), at most `max_bytes` UTF-8 bytes in all:
    the last document is cut at a line boundary to fit. ``None`` reads everything (about 12 MB)."""
    documents = [text for _, text in _iter_default_documents(max_bytes, seed)]
    if not documents:
        raise ValueError(f"the default corpus under {stdlib_root()} holds no readable .py/.txt/.rst files")
    return documents


def document_bytes(document: Any) -> int:
    """UTF-8 size of a document: a string, or a record (dict) with a ``"text"`` field; 1 for anything else."""
    if isinstance(document, str):
        return len(document.encode("utf-8"))
    if isinstance(document, dict) and isinstance(document.get("text"), str):
        return len(document["text"].encode("utf-8"))
    return 1


def corpus_bytes(documents: Sequence[Any]) -> int:
    """Total UTF-8 size of `documents` (see `document_bytes`)."""
    return sum(document_bytes(document) for document in documents)


def train_heldout_split(
    documents: Sequence[T], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Split whole documents into (train, heldout), each in the original order.

    The held-out part holds about `heldout_fraction` of the text, measured in bytes for strings and ``{"text": ...}``
    records (in documents for anything else): documents are visited in a seeded shuffle and held out while that keeps
    the held-out part under 1.5x its target, until the target is met. Whole documents, so no file is seen in part by
    both sides. ``heldout_fraction=0`` holds nothing out; otherwise each side gets at least one document.
    """
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)):
        raise ValueError(f"heldout_fraction={heldout_fraction!r} is not allowed: a number in [0, 1)")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction!r} is not allowed: a number in [0, 1)")
    documents = list(documents)
    if heldout_fraction == 0.0:
        return documents, []
    if len(documents) < 2:
        raise ValueError(
            f"cannot hold out {heldout_fraction:.0%} of {len(documents)} document(s): a split needs at least 2 "
            "(one to train on, one to hold out)"
        )
    sizes = [document_bytes(document) for document in documents]
    target = heldout_fraction * sum(sizes)
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    held_bytes = 0
    for index in order:
        if held_bytes >= target:
            break
        if held_bytes + sizes[index] <= 1.5 * target:
            held.add(index)
            held_bytes += sizes[index]
    if not held:  # every document is larger than the target: hold out the smallest one
        held.add(min(order, key=lambda index: sizes[index]))
    if len(held) == len(documents):  # keep at least one document to train on
        held.discard(max(held, key=lambda index: sizes[index]))
    train = [document for index, document in enumerate(documents) if index not in held]
    heldout = [document for index, document in enumerate(documents) if index in held]
    return train, heldout


__all__ = [
    "EXCLUDED_DIRS",
    "TEXT_SUFFIXES",
    "corpus_bytes",
    "default_corpus_files",
    "document_bytes",
    "load_default_corpus",
    "stdlib_root",
    "train_heldout_split",
]
