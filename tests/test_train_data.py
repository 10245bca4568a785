"""The training library's data side: records, tokenizers, packing (in memory == streamed), MLM masking, the seeded
order and its exact resumption, batch slicing, and the shipped accuracy / F1 metrics against plain references."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hf_xarch.train.config import Config
from hf_xarch.train.data import (
    ExampleOrder,
    load_records,
    mask_for_mlm,
    pack_blocks,
    pad_batch,
    slice_batch,
    stream_blocks,
)
from hf_xarch.train.tokenizer import SPECIAL_TOKENS, check_tokenizer_for_task, load_tokenizer, train_tokenizer

STDLIB = Path(json.__file__).resolve().parent.parent  # the standard library: text on every machine


def _texts(count: int = 6) -> list[str]:
    names = ["bisect.py", "abc.py", "keyword.py", "colorsys.py", "fnmatch.py", "genericpath.py", "this.py", "struct.py"]
    return [(STDLIB / name).read_text() for name in names[:count]]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_texts(), vocab_size=300, causal=True)


def _data_cfg(**overrides) -> Config:
    from hf_xarch.train.pretrain import DEFAULTS

    values = dict(DEFAULTS["data"])
    values.update(overrides)
    return Config(values)


# ---- tokenizers -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["bpe", "unigram", "wordpiece"])
def test_trained_tokenizers_share_the_special_layout(algorithm, tmp_path):
    tok = train_tokenizer(_texts(4), vocab_size=200, algorithm=algorithm, causal=False)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 2, 3, 4)
    ids = tok("def f(x): return x")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3  # encoders get <s> ... </s>
    tok.save_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path)("def f(x): return x")["input_ids"] == ids
    assert load_tokenizer(tmp_path / "tokenizer.json")("def f(x): return x")["input_ids"] == ids


def test_byte_level_bpe_is_lossless_and_causal_template_has_no_eos(tokenizer):
    text = "Ünïcode ✓ and\ttabs\n    x = 1"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="tokenizer.algorithm"):
        train_tokenizer(["x"], algorithm="bytepair")
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        train_tokenizer(["x"], vocab_size=3)
    with pytest.raises(ValueError, match="tokenizer.path"):
        load_tokenizer("/no/such/tokenizer")


def test_tokenizer_without_mask_token_is_refused_for_mlm(tokenizer):
    tok = train_tokenizer(_texts(2), vocab_size=120)
    tok.mask_token = None
    with pytest.raises(ValueError, match="mask_token"):
        check_tokenizer_for_task(tok, "mlm")
    check_tokenizer_for_task(tokenizer, "clm")


# ---- packing --------------------------------------------------------------------------------------------------------
def test_packing_concatenates_documents_with_separators(tokenizer):
    texts = _texts()
    blocks, counts = pack_blocks(texts, tokenizer, block_size=37)
    stream = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # <s> doc </s>
    assert counts["tokens"] == len(stream)
    assert counts["bytes"] == sum(len(t.encode()) for t in texts)
    assert blocks.shape == (len(stream) // 37, 37)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]  # the partial last block is dropped


@pytest.mark.parametrize("causal", [True, False])
def test_streamed_packing_equals_packing_in_memory(tokenizer, causal):
    texts = _texts() * 2
    blocks, _ = pack_blocks(texts, tokenizer, block_size=29, causal=causal, batch=5)
    streamed = list(stream_blocks(iter(texts), tokenizer, block_size=29, causal=causal, batch=3))
    assert torch.equal(torch.stack(streamed), blocks)


def test_block_size_must_hold_two_tokens(tokenizer):
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks(["abc"], tokenizer, block_size=1)


# ---- MLM masking ----------------------------------------------------------------------------------------------------
def test_mlm_masking_follows_bert(tokenizer):
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(5, len(tokenizer), (64, 128), generator=generator)
    ids[:, 0], ids[:, -1], ids[3, 10:20] = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    inputs, labels = mask_for_mlm(ids, tokenizer, 0.15, torch.Generator().manual_seed(5))
    chosen = labels.ne(-100)
    special = (ids == tokenizer.bos_token_id) | (ids == tokenizer.eos_token_id) | (ids == tokenizer.pad_token_id)
    assert not (chosen & special).any(), "special tokens are never masked"
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    share = chosen.float().sum() / (~special).float().sum()
    assert 0.13 < share < 0.17
    masked = (inputs == tokenizer.mask_token_id) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85
    again = mask_for_mlm(ids, tokenizer, 0.15, torch.Generator().manual_seed(5))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_for_mlm(ids, tokenizer, 1.5, generator)


# ---- the seeded order and exact resumption --------------------------------------------------------------------------
def test_in_memory_order_visits_everything_each_epoch_and_resumes_exactly():
    examples = list(range(23))
    order = ExampleOrder(examples=examples, seed=3)
    first_epoch = order.take(23)
    assert sorted(first_epoch) == examples and first_epoch != examples
    second = order.take(23)
    assert sorted(second) == examples and second != first_epoch
    reference = ExampleOrder(examples=examples, seed=3)
    reference.take(17)
    state = reference.state_dict()
    expected = reference.take(40)
    resumed = ExampleOrder(examples=examples, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(40) == expected


def test_streamed_order_resumes_exactly():
    data = [f"item{i}" for i in range(13)]

    def stream(epoch):
        rng = random.Random(epoch)
        shuffled = data[:]
        rng.shuffle(shuffled)
        return iter(shuffled)

    order = ExampleOrder(stream=stream)
    order.take(20)  # crosses into epoch 1
    state = order.state_dict()
    assert state["epoch"] == 1
    expected = order.take(15)
    resumed = ExampleOrder(stream=stream)
    resumed.load_state_dict(state)
    assert resumed.take(15) == expected


def test_empty_orders_are_refused():
    with pytest.raises(ValueError, match="empty"):
        ExampleOrder(examples=[])
    with pytest.raises(ValueError, match="empty"):
        ExampleOrder(stream=lambda epoch: iter([])).take(1)


def test_pad_and_slice_trim_padding_columns():
    batch = pad_batch([[5, 6, 7, 8], [5], [6, 7]], pad_id=0, label_rows=[[1, 2, 3, 4], [1], [1, 2]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 0, 0, 0], [6, 7, 0, 0]]
    assert batch["labels"][1].tolist() == [1, -100, -100, -100]
    part = slice_batch(batch, 1, 3)
    assert part["input_ids"].tolist() == [[5, 0], [6, 7]] and part["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert part["labels"].tolist() == [[1, -100], [1, 2]]


# ---- records --------------------------------------------------------------------------------------------------------
def test_local_files_of_each_format(tmp_path):
    rows = [{"text": f"document number {i} " * 5, "label": i % 2} for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "a.csv").write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in rows))
    import pandas

    pandas.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        records = load_records(_data_cfg(files=[str(tmp_path / name)], heldout_fraction=0.2), seed=0)
        assert len(records.train) + len(records.heldout) == 30 and records.heldout
        assert {r["text"] for r in records.train + records.heldout} == {r["text"] for r in rows}


def test_text_files_are_documents_and_streaming_holds_out_the_head(tmp_path):
    for index, text in enumerate(_texts(5)):
        (tmp_path / f"doc{index}.txt").write_text(text)
    files = sorted(str(p) for p in tmp_path.glob("*.txt"))
    records = load_records(_data_cfg(files=files, heldout_fraction=0.2), seed=0)
    assert len(records.train) + len(records.heldout) == 5
    streamed = load_records(_data_cfg(files=files, streaming=True, heldout_records=2, shuffle_buffer=10), seed=0)
    assert streamed.train is None and len(streamed.heldout) == 2
    epoch0 = [r["text"] for r in streamed.stream(0)]
    assert len(epoch0) == 3 and sorted(epoch0) == sorted(r["text"] for r in [*map(dict, _stream_all(files))][2:])


def _stream_all(files):
    return [{"text": Path(f).read_text()} for f in files]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"files": ["/no/such/file.txt"]}, "no such file"),
        ({"files": ["{tmp}/x.docx"]}, "unknown suffix"),
        ({"files": ["{tmp}/a.json", "{tmp}/b.csv"]}, "mixes formats"),
        ({"files": ["{tmp}/a.json"], "text_column": "body"}, "not a column"),
        ({"files": ["{tmp}/a.json"], "dataset": "wikitext"}, "not both"),
        ({"files": ["{tmp}/empty.txt"]}, "empty"),
    ],
)
def test_bad_data_is_refused_before_training(tmp_path, overrides, message):
    (tmp_path / "x.docx").write_text("x")
    (tmp_path / "a.json").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "b.csv").write_text("text\nhello\n")
    (tmp_path / "empty.txt").write_text("")
    overrides = {k: [v.format(tmp=tmp_path) for v in val] if k == "files" else val for k, val in overrides.items()}
    with pytest.raises(ValueError, match=message):
        load_records(_data_cfg(**overrides), seed=0)


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="could not load Hub dataset"):
        load_records(_data_cfg(dataset="surely-not-a-local/dataset-xyz"), seed=0)


# ---- metrics --------------------------------------------------------------------------------------------------------
def _f1_reference(pred, ref, average):
    """sklearn's definition, written out per class."""
    classes = sorted(set(pred) | set(ref)) if average != "binary" else [1]
    scores, supports = [], []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(pred, ref))
        fp = sum(p == c and r != c for p, r in zip(pred, ref))
        fn = sum(p != c and r == c for p, r in zip(pred, ref))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        supports.append(sum(r == c for r in ref))
    if average == "weighted":
        return sum(s * n for s, n in zip(scores, supports)) / sum(supports)
    if average == "micro":
        tp = sum(p == r for p, r in zip(pred, ref))
        return tp / len(ref)  # single-label micro F1 is accuracy
    return sum(scores) / len(scores)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shipped_metrics_match_their_definitions(seed):
    from hf_xarch.metrics import load_metric

    rng = random.Random(seed)
    n, k = rng.randint(5, 60), rng.randint(2, 5)
    ref = [rng.randrange(k) for _ in range(n)]
    pred = [r if rng.random() < 0.6 else rng.randrange(k) for r in ref]
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")
    assert accuracy.compute(predictions=pred, references=ref)["accuracy"] == pytest.approx(
        sum(p == r for p, r in zip(pred, ref)) / n
    )
    for average in ("macro", "weighted", "micro"):
        got = f1.compute(predictions=pred, references=ref, average=average)["f1"]
        assert got == pytest.approx(_f1_reference(pred, ref, average)), average
    binary_pred, binary_ref = [p % 2 for p in pred], [r % 2 for r in ref]
    got = f1.compute(predictions=binary_pred, references=binary_ref)["f1"]
    assert got == pytest.approx(_f1_reference(binary_pred, binary_ref, "binary"))


def test_unknown_metric_is_refused():
    from hf_xarch.metrics import metric_path

    with pytest.raises(ValueError, match="available"):
        metric_path("meteor")
