"""Data for the recipes: documents from the default corpus, local files or a Hub dataset; packing into blocks;
masking for MLM; and the seeded order in which examples form global batches.

The order of examples is a pure function of (seed, epoch) - a permutation per epoch for data held in memory, the
stream order (reshuffled per epoch in a buffer) for streamed data - and MLM masks are a pure function of
(seed, step). So a resumed run sees exactly the batches the interrupted one would have seen, and N processes that
share a global batch see the same rows one process would (every process reads the whole global batch and keeps its
slice; cheap at the scale of CPU training, and it keeps the arithmetic identical).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", **{s: "text" for s in TEXT_SUFFIXES}}


@dataclass
class Records:
    """Training and held-out records (dicts with at least the text column), in memory or as a stream.

    `stream(epoch)` returns a fresh iterator over the training records for that epoch when the data is streamed;
    `train` holds them when it is not. `heldout` is always in memory (it is small)."""

    train: list[dict] | None
    heldout: list[dict]
    stream: Callable[[int], Iterator[dict]] | None = None
    description: str = ""
    columns: list[str] = field(default_factory=list)


def _file_format(files: list[Path]) -> str:
    formats = set()
    for path in files:
        suffix = path.suffix.lower()
        if suffix not in FORMATS:
            raise ValueError(f"data.files: {str(path)!r} has an unknown suffix {suffix!r}; allowed: {sorted(FORMATS)}")
        formats.add(FORMATS[suffix])
    if len(formats) > 1:
        raise ValueError(f"data.files mixes formats {sorted(formats)}; give files of one format")
    return formats.pop()


def _check_column(columns: Iterable[str], column: str, key: str, where: str) -> None:
    columns = list(columns)
    if column not in columns:
        raise ValueError(f"data.{key}={column!r} is not a column of {where}; its columns are {columns}")


def load_records(data_cfg, seed: int = 0, required_columns: dict[str, str] | None = None) -> Records:
    """Records from the config's data section: ``files`` (local text/json/jsonl/csv/parquet), ``dataset`` (a Hub
    dataset name, needs a connection) or, when both are empty, the default corpus that ships with every Python.

    `required_columns` maps config keys to column names that must exist (``{"text_column": "text"}``).
    Raises ValueError for missing files, unknown columns and empty data, before anything trains."""
    required_columns = required_columns or {"text_column": data_cfg.text_column}
    files, dataset = list(data_cfg.files or []), data_cfg.dataset
    if files and dataset:
        raise ValueError(f"give data.files={files!r} or data.dataset={dataset!r}, not both")
    if not files and not dataset:
        return _default_corpus_records(data_cfg, seed, required_columns)

    import datasets

    streaming = bool(data_cfg.streaming)
    if files:
        paths = [Path(name).expanduser() for name in files]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise ValueError(f"data.files: no such file(s): {missing}")
        fmt = _file_format(paths)
        kwargs = {"sample_by": data_cfg.sample_by} if fmt == "text" else {}
        source = f"{len(paths)} local {fmt} file(s): " + ", ".join(path.name for path in paths[:3])
        loader = lambda: datasets.load_dataset(
            fmt, data_files=[str(path) for path in paths], split="train", streaming=streaming, **kwargs
        )
    else:
        source = f"Hub dataset {dataset!r}" + (f" ({data_cfg.dataset_config})" if data_cfg.dataset_config else "")
        loader = lambda: datasets.load_dataset(
            dataset, data_cfg.dataset_config, split=data_cfg.split, streaming=streaming
        )
    try:
        loaded = loader()
    except (FileNotFoundError, ConnectionError, OSError) as err:
        raise ValueError(f"could not load {source}: {err}") from err
    columns = list(loaded.column_names or [])
    if not columns and streaming:  # streamed datasets may only know their columns after the first record
        first = next(iter(loaded), None)
        columns = list(first) if first else []
    for key, column in required_columns.items():
        _check_column(columns, column, key, source)
    if not streaming:
        records = [dict(row) for row in loaded]
        if data_cfg.max_examples:
            records = records[: data_cfg.max_examples]
        return _split_in_memory(records, data_cfg, seed, source, columns)
    return _streamed(loaded, data_cfg, seed, source, columns)


def _default_corpus_records(data_cfg, seed: int, required_columns: dict[str, str]) -> Records:
    from .corpus import load_default_corpus

    for key, column in required_columns.items():
        if column != "text":
            raise ValueError(f"data.{key}={column!r}: the default corpus has only the column 'text'")
    documents = load_default_corpus(max_bytes=data_cfg.max_bytes, seed=seed)
    records = [{"text": text} for text in documents if text]
    source = f"the default corpus (Python standard library text and code, {len(records)} documents)"
    if data_cfg.streaming:
        # streaming the small default corpus is mostly for testing the streamed path without a download
        heldout, train = _heldout_head(records, data_cfg)
        return Records(None, heldout, _list_stream(train, seed), source, ["text"])
    return _split_in_memory(records, data_cfg, seed, source, ["text"])


def _split_in_memory(records: list[dict], data_cfg, seed: int, source: str, columns: list[str]) -> Records:
    from .corpus import train_heldout_split

    text_columns = [c for c in (getattr(data_cfg, "text_column", None),) if c in columns]
    # records whose text is empty carry nothing to learn (an empty file, a blank line)
    records = [r for r in records if not text_columns or (r.get(text_columns[0]) or "").strip()]
    if not records:
        raise ValueError(f"{source} holds no records: the dataset is empty")
    try:
        train, heldout = train_heldout_split(records, heldout_fraction=data_cfg.heldout_fraction, seed=seed)
    except ValueError as err:
        hint = " (data.sample_by=paragraph or line cuts text files into more records)" if "text file" in source else ""
        raise ValueError(f"{source}: {err}{hint}") from err
    train, heldout = list(train), list(heldout)
    if not train:
        raise ValueError(f"{source}: no training records left after holding out {data_cfg.heldout_fraction:.0%}")
    return Records(train, heldout, None, f"{source}; {len(train)} train / {len(heldout)} held-out records", columns)


def _heldout_head(records: list[dict], data_cfg) -> tuple[list[dict], list[dict]]:
    count = max(1, math.ceil(len(records) * data_cfg.heldout_fraction)) if data_cfg.heldout_fraction > 0 else 0
    if len(records) - count <= 0:
        raise ValueError("the dataset is empty (or too small to hold out data.heldout_fraction of it)")
    return records[:count], records[count:]


def _list_stream(records: list[dict], seed: int) -> Callable[[int], Iterator[dict]]:
    def stream(epoch: int) -> Iterator[dict]:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return (records[index] for index in order.tolist())

    return stream


def _streamed(loaded, data_cfg, seed: int, source: str, columns: list[str]) -> Records:
    """A streamed dataset: the first `data.heldout_records` records are held out (the total is unknown up front),
    the rest stream in a buffer shuffled afresh each epoch."""
    heldout_count = int(data_cfg.heldout_records)
    heldout = [dict(row) for _, row in zip(range(heldout_count), loaded)]
    rest = loaded.skip(heldout_count)
    if next(iter(rest), None) is None:
        raise ValueError(f"{source} holds no records after the {heldout_count} held out: the dataset is empty")

    def stream(epoch: int) -> Iterator[dict]:
        shuffled = rest.shuffle(seed=seed * 100_003 + epoch, buffer_size=data_cfg.shuffle_buffer)
        limit = data_cfg.max_examples or None
        for index, row in enumerate(shuffled):
            if limit is not None and index >= limit:
                return
            yield dict(row)

    return Records(None, heldout, stream, f"{source} (streamed); {len(heldout)} held-out records", columns)


# ---- language-model blocks ------------------------------------------------------------------------------------------
def _document_ids(tokenizer, texts: list[str], causal: bool) -> list[list[int]]:
    """Token ids of each document with the separators packing needs: ``<s> doc </s>`` for both objectives (the
    trained tokenizers' templates already add ``<s>`` and, for MLM, ``</s>``; whatever is missing is added here)."""
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    documents = []
    for ids in encoded:
        ids = list(ids)
        if bos is not None and (not ids or ids[0] != bos) and causal:
            ids.insert(0, bos)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        documents.append(ids)
    return documents


def pack_blocks(
    texts: Sequence[str], tokenizer, block_size: int, causal: bool = True, batch: int = 256
) -> tuple[torch.Tensor, dict]:
    """Concatenate the tokenized documents and cut them into rows of `block_size` (the last partial row is dropped,
    as GPT-2's and run_clm's packing do). Returns the (rows, block_size) tensor and {tokens, bytes} counts of the
    text that went in, so bits per byte can be reported."""
    if block_size < 2:
        raise ValueError(f"data.block_size={block_size} is not allowed: at least 2 tokens")
    stream: list[int] = []
    total_bytes = 0
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        total_bytes += sum(len(text.encode("utf-8")) for text in chunk)
        for ids in _document_ids(tokenizer, chunk, causal):
            stream.extend(ids)
    rows = len(stream) // block_size
    blocks = torch.tensor(stream[: rows * block_size], dtype=torch.long).view(rows, block_size)
    return blocks, {"tokens": len(stream), "bytes": total_bytes}


def stream_blocks(texts: Iterable[str], tokenizer, block_size: int, causal: bool = True, batch: int = 64) -> Iterator[torch.Tensor]:
    """The streaming twin of `pack_blocks`: tokenizes `batch` documents at a time and yields full blocks as they fill."""
    buffer: list[int] = []
    chunk: list[str] = []

    def drain(documents: list[str]) -> Iterator[torch.Tensor]:
        for ids in _document_ids(tokenizer, documents, causal):
            buffer.extend(ids)
        while len(buffer) >= block_size:
            yield torch.tensor(buffer[:block_size], dtype=torch.long)
            del buffer[:block_size]

    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            yield from drain(chunk)
            chunk = []
    if chunk:
        yield from drain(chunk)


def mask_for_mlm(
    input_ids: torch.Tensor, tokenizer, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al. 2019): choose `probability` of the non-special tokens; of those 80% become
    ``<mask>``, 10% a random token, 10% stay. Labels are the original ids there and -100 elsewhere."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"training.mlm_probability={probability} is not allowed: in (0, 1)")
    labels = input_ids.clone()
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in tokenizer.all_special_ids:
        special |= input_ids == token_id
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    inputs = input_ids.clone()
    to_mask = chosen & (torch.rand(input_ids.shape, generator=generator) < 0.8)
    inputs[to_mask] = tokenizer.mask_token_id
    to_random = chosen & ~to_mask & (torch.rand(input_ids.shape, generator=generator) < 0.5)
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator)
    inputs[to_random] = random_ids[to_random]
    return inputs, labels


# ---- batching -------------------------------------------------------------------------------------------------------
class ExampleOrder:
    """Hands out examples for global batches in a seeded order and remembers where it is, for exact resumption.

    In memory: epoch e visits the examples in ``randperm(n, seed, e)``. Streamed: `stream(e)` gives epoch e's
    order. The position is (epoch, offset) and `load_state_dict` puts it back (a stream is replayed and skipped)."""

    def __init__(
        self,
        examples: Sequence | None = None,
        stream: Callable[[int], Iterator] | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if (examples is None) == (stream is None):
            raise ValueError("ExampleOrder needs exactly one of examples or stream")
        if examples is not None and len(examples) == 0:
            raise ValueError("no training examples: the dataset is empty (or shorter than one block)")
        self.examples, self.stream, self.seed, self.shuffle = examples, stream, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order: list[int] | None = None
        self._iterator: Iterator | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            n = len(self.examples)
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(n, generator=generator).tolist()
            else:
                self._order = list(range(n))
        return self._order

    def _next(self) -> Any:
        if self.examples is not None:
            order = self._epoch_order()
            if self.offset >= len(order):
                self.epoch, self.offset, self._order = self.epoch + 1, 0, None
                order = self._epoch_order()
            item = self.examples[order[self.offset]]
            self.offset += 1
            return item
        for attempt in range(2):
            if self._iterator is None:
                self._iterator = iter(self.stream(self.epoch))
            try:
                item = next(self._iterator)
                self.offset += 1
                return item
            except StopIteration:
                if attempt == 1 or self.offset == 0:
                    raise ValueError("the training stream produced no examples: the dataset is empty") from None
                self.epoch, self.offset, self._iterator = self.epoch + 1, 0, None
        raise AssertionError("unreachable")

    def take(self, count: int) -> list:
        """The next `count` examples (crossing into the next epoch when one runs out)."""
        return [self._next() for _ in range(count)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order, self._iterator = None, None
        if self.stream is not None:
            self._iterator = iter(self.stream(self.epoch))
            for _ in range(self.offset):  # replaying is the price of resuming a stream exactly
                next(self._iterator)


def pad_batch(sequences: list[list[int]], pad_id: int, label_rows: list[list[int]] | None = None) -> dict:
    """Right-pad token lists into input_ids / attention_mask (and token labels, padded with -100)."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    labels = torch.full((len(sequences), longest), -100, dtype=torch.long) if label_rows is not None else None
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        if labels is not None:
            labels[row, : len(ids)] = torch.tensor(label_rows[row], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        batch["labels"] = labels
    return batch


# a seq2seq batch's target side: it has its own length and mask, whatever the width of the source
DECODER_KEYS = ("labels", "decoder_input_ids", "decoder_attention_mask")


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    """Rows [start, stop) of every tensor in `batch`, with columns that are padding in every row trimmed off (the
    target side of a seq2seq batch, which has a ``decoder_attention_mask``, by its own mask)."""
    part = {key: value[start:stop] for key, value in batch.items()}
    if "decoder_attention_mask" not in part:
        return _trim(part, list(part), "attention_mask")
    part = _trim(part, [key for key in part if key not in DECODER_KEYS], "attention_mask")
    return _trim(part, [key for key in part if key in DECODER_KEYS], "decoder_attention_mask")


def _trim(part: dict, keys: list[str], mask_key: str) -> dict:
    """`part` with the columns of its 2-D tensors `keys` cut after the last one that `mask_key` marks in any row."""
    mask = part.get(mask_key)
    if mask is None or mask.dim() != 2 or not mask.numel():
        return part
    used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    if used == mask.shape[1]:
        return part
    return {key: value[:, :used] if key in keys and value.dim() == 2 and value.shape[1] == mask.shape[1] else value
            for key, value in part.items()}
