"""The tokenizer vocabulary sweep (hf_xarch.vocab) and the default corpus (hf_xarch.train.corpus).

Tiny corpora and sizes keep this fast; the one end-to-end run covers the bits-per-byte step with a two-step LM.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_xarch.train.corpus import (
    EXCLUDED_DIRS,
    TEXT_SUFFIXES,
    corpus_bytes,
    default_corpus_files,
    load_default_corpus,
    stdlib_root,
    train_heldout_split,
)
from hf_xarch.vocab import algorithms, language_model, metrics, report
from hf_xarch.vocab.sweep import SweepConfig, config_from_args, run_sweep

REPO = Path(__file__).resolve().parents[1]
SMALL_LM = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # the LMs here are tiny: on a shared 2-core machine, a second intra-op thread only adds synchronisation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    documents = load_default_corpus(max_bytes=150_000, seed=0)
    return train_heldout_split(documents, heldout_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def trained(corpus):
    train, _ = corpus
    return {name: algorithms.train_tokenizer(name, train, 400) for name in algorithms.ALGORITHMS}


# ---- the default corpus -------------------------------------------------------------------------------------------------
def test_default_corpus_is_capped_deterministic_and_from_the_stdlib():
    documents = load_default_corpus(max_bytes=50_000)
    assert documents == load_default_corpus(max_bytes=50_000)
    assert 40_000 < corpus_bytes(documents) <= 50_000
    assert load_default_corpus(max_bytes=50_000, seed=1) != documents
    files = default_corpus_files(max_bytes=50_000)
    assert len(files) == len(documents)
    root = stdlib_root()
    for path, text in zip(files, documents):
        relative = path.relative_to(root)
        assert path.suffix in TEXT_SUFFIXES and not set(relative.parts) & EXCLUDED_DIRS
        assert path.read_text(encoding="utf-8").startswith(text)  # the last one may be cut at a line boundary
    assert documents[-1].endswith("\n")


def test_default_corpus_files_cover_the_stdlib_but_not_tests_or_site_packages():
    files = default_corpus_files()
    relative = {path.relative_to(stdlib_root()).as_posix() for path in files}
    assert "os.py" in relative and "pydoc_data/topics.py" in relative
    assert not any(part in EXCLUDED_DIRS for name in relative for part in name.split("/"))
    assert len(files) == len(set(files)) > 300


def test_train_heldout_split_holds_out_whole_documents_by_bytes():
    rng = random.Random(7)
    documents = ["x" * rng.randint(10, 3000) + str(index) for index in range(200)]
    train, heldout = train_heldout_split(documents, 0.2, seed=3)
    assert sorted(train + heldout) == sorted(documents) and not set(train) & set(heldout)
    assert 0.2 <= corpus_bytes(heldout) / corpus_bytes(documents) <= 0.3
    assert train == [document for document in documents if document in set(train)]  # original order kept
    assert (train, heldout) == train_heldout_split(documents, 0.2, seed=3)
    assert heldout != train_heldout_split(documents, 0.2, seed=4)[1]
    assert train_heldout_split(documents, 0.0) == (documents, [])
    records = [{"text": document} for document in documents[:10]]
    train_records, heldout_records = train_heldout_split(records, 0.5)
    assert len(train_records) + len(heldout_records) == 10 and heldout_records and train_records
    one_giant = ["a" * 10_000, "b" * 10]
    assert train_heldout_split(one_giant, 0.1) == (["a" * 10_000], ["b" * 10])


@pytest.mark.parametrize("fraction", [1.0, -0.1, "0.1", True])
def test_train_heldout_split_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="heldout_fraction"):
        train_heldout_split(["a", "b"], fraction)


def test_train_heldout_split_needs_two_documents():
    with pytest.raises(ValueError, match="at least 2"):
        train_heldout_split(["only one"], 0.1)


# ---- tokenizers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(algorithms.ALGORITHMS))
def test_tokenizers_are_lossless_and_load_with_autotokenizer(name, trained, corpus, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = trained[name]
    assert algorithms.vocab_size(tokenizer) == 400
    text = corpus[1][0][:4000]
    encoding = tokenizer.encode(text, add_special_tokens=False)
    assert algorithms.UNK not in encoding.tokens
    assert tokenizer.decode(encoding.ids) == text
    folder = algorithms.save_tokenizer(tokenizer, tmp_path / name)
    loaded = AutoTokenizer.from_pretrained(str(folder))
    assert loaded(text, add_special_tokens=False)["input_ids"] == encoding.ids
    assert loaded.decode(encoding.ids) == text
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len(loaded) == 400


def test_unigram_spells_unseen_characters_as_bytes(trained):
    tokenizer = trained["unigram"]
    text = "x = '日本 ☃ héllo'\n"
    encoding = tokenizer.encode(text, add_special_tokens=False)
    assert "<0xE6>" in encoding.tokens and algorithms.UNK not in encoding.tokens
    assert tokenizer.decode(encoding.ids) == text
    assert metrics.text_metrics(tokenizer, [text])["unk_per_byte"] == 0.0


def test_wordpiece_unknown_rate_counts_the_bytes_of_unknown_words(trained):
    tokenizer = trained["wordpiece"]
    text = "return value ☃☃ x\n"  # U+2603 never occurs in the training text: its word becomes <unk>
    assert algorithms.UNK in tokenizer.encode(text, add_special_tokens=False).tokens
    result = metrics.text_metrics(tokenizer, [text])
    assert result["unk_per_byte"] == pytest.approx(len("☃☃".encode()) / len(text.encode()))
    assert metrics.text_metrics(trained["bpe"], [text])["unk_per_byte"] == 0.0


def test_bpe_vocabulary_prefixes_equal_training_each_size(corpus):
    train, heldout = corpus
    sizes = [300, 420, 650]
    text = heldout[0][:5000]
    for item in algorithms.train_merge_prefix("bpe", train, sizes):
        direct = algorithms.train_tokenizer("bpe", train, item.requested_size)
        assert item.tokenizer.get_vocab() == direct.get_vocab()
        assert item.tokenizer.encode(text).ids == direct.encode(text).ids
        assert item.vocab_size == item.requested_size


def test_unknown_algorithms_and_impossible_sizes_are_rejected(corpus):
    with pytest.raises(ValueError, match="sentencepiece.*allowed: bpe, wordpiece, unigram"):
        algorithms.check_algorithms("bpe,sentencepiece")
    with pytest.raises(ValueError, match="at least 260"):
        algorithms.train_tokenizer("bpe", corpus[0], 100)
    with pytest.raises(ValueError, match="wordpiece starts from"):
        algorithms.train_tokenizer("wordpiece", corpus[0], 60)
    with pytest.raises(ValueError, match="too small for unigram"):
        SweepConfig(algorithms=["unigram"], sizes=[200, 1000])


# ---- metrics ---------------------------------------------------------------------------------------------------------
def _random_text(rng: random.Random, length: int) -> str:
    alphabet = "ab é日 \n\t  ,.()"
    return "".join(rng.choice(alphabet) for _ in range(length))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokens_per_word_matches_the_loop_reference(seed):
    rng = random.Random(seed)
    text = _random_text(rng, rng.randint(50, 300))
    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(2, 40)))
    spans = [(a, b) for a, b in itertools.pairwise(cuts)] + [(c, c) for c in cuts[:3]]  # empty spans count for nothing
    rng.shuffle(spans)
    fast = metrics.tokens_per_word(text, np.array(spans, dtype=np.int64).reshape(-1, 2))
    assert fast.tolist() == metrics.tokens_per_word_reference(text, spans)


def test_byte_offsets_are_utf8_positions():
    text = _random_text(random.Random(5), 200) + "𝄞"
    assert metrics.byte_offsets(text).tolist() == [len(text[:i].encode()) for i in range(len(text) + 1)]


def test_renyi_efficiency_matches_the_authors_scorer():
    # tokenization-scorer's own tests (Zouhar et al. 2023), which divide by the number of distinct tokens seen:
    # "pick @@ed pick @@l @@ed pick @@les" and "pick @@e @@d pick @@l @@e @@d pick @@l @@e @@s"
    first, second = [3, 2, 1, 1], [3, 3, 2, 2, 1]
    assert metrics.renyi_efficiency(first, 4, 2.5) == pytest.approx(0.8265064834225245, abs=1e-9)
    assert metrics.renyi_efficiency(second, 5, 2.5) == pytest.approx(0.9204840242168808, abs=1e-9)
    assert metrics.renyi_entropy(first, 2.5) == pytest.approx(1.653012966845049, abs=1e-9)
    assert metrics.renyi_efficiency(first, 4, 1.0) == pytest.approx(0.9211854965885544, abs=1e-9)
    assert metrics.renyi_efficiency([5] * 8, 8) == pytest.approx(1.0)
    assert metrics.renyi_efficiency([5] * 8 + [0] * 8, 16) == pytest.approx(0.75)  # unused tokens cost efficiency


@pytest.mark.parametrize("name", list(algorithms.ALGORITHMS))
def test_token_counts_from_chunks_equal_encoding_the_whole_text(name, trained, corpus):
    tokenizer = trained[name]
    documents = corpus[0][:30] + ["trailing spaces   \n\n", "  leading\u3000ideographic space\x1cgroup sep"]
    chunks, weights = metrics.count_chunks(documents)
    fast = metrics.token_counts_from_chunks(tokenizer, chunks, weights)
    ids = [i for document in documents for i in tokenizer.encode(document, add_special_tokens=False).ids]
    assert fast.tolist() == np.bincount(ids, minlength=len(fast)).tolist()


def test_text_metrics_agree_with_direct_counts(trained, corpus):
    tokenizer = trained["bpe"]
    heldout = corpus[1]
    result = metrics.text_metrics(tokenizer, heldout)
    encodings = [tokenizer.encode(document, add_special_tokens=False) for document in heldout]
    tokens = sum(len(encoding.ids) for encoding in encodings)
    words = sum(len(document.split()) for document in heldout)
    assert result["tokens"] == tokens and result["bytes"] == corpus_bytes(heldout) and result["words"] == words
    assert result["bytes_per_token"] == pytest.approx(corpus_bytes(heldout) / tokens)
    used = {i for encoding in encodings for i in encoding.ids}
    learned = [i for i in range(400) if metrics.learned_token_mask(tokenizer)[i]]
    assert len(learned) == 400 - 4 - 256
    assert result["unused_tokens"] == sum(1 for i in learned if i not in used)
    assert 0 < result["renyi_efficiency"] < 1 and 0 < result["split_word_share"] < 1


CONFIGS = [
    {},
    {"tie_word_embeddings": False},
    {"embedding_size": 16, "tie_word_embeddings": False},
    {"mlp_type": "gated", "norm_type": "rmsnorm", "attention_bias": False, "mlp_bias": False},
    {"num_key_value_heads": 1, "position_embedding_type": "rope", "head_dim": 6},
    {"type_vocab_size": 2, "embedding_norm": True, "position_embedding_type": "sinusoidal"},
    {"num_hidden_layers": 4, "num_hidden_groups": 1},
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_parameter_formula_equals_the_built_model(overrides):
    values = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, **overrides}
    config = metrics.target_config(values, vocab_size=311)
    assert metrics.parameter_count_formula(config) == metrics.count_parameters(config)
    costs = metrics.model_costs(config)
    assert costs["embedding_params"] == metrics.embedding_parameter_formula(config)
    assert costs["total_params"] == metrics.count_parameters(config)
    assert costs["embedding_share"] == pytest.approx(costs["embedding_params"] / costs["total_params"])


# ---- bits per byte ---------------------------------------------------------------------------------------------------
def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_byte(trained, corpus):
    tokenizer = trained["unigram"]
    settings = language_model.LMSettings(steps=1, seq_len=24, model=SMALL_LM)
    model, _ = language_model.train_language_model(tokenizer, corpus[0], settings)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: every logit is 0, p = 1/V for every token
    text = language_model.evaluation_text(corpus[1], 3000)
    result = language_model.heldout_bits_per_byte(model, tokenizer, text, seq_len=24, batch_size=5)
    stream = language_model.token_stream(tokenizer, text)
    text_tokens = int((stream != tokenizer.token_to_id("</s>")).sum())
    assert result["heldout_scored_tokens"] == text_tokens  # each text token scored once, end-of-sequence ones not
    assert result["heldout_bytes"] == corpus_bytes(text) <= 3000
    expected = text_tokens * math.log2(400) / corpus_bytes(text)
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_step_trains_and_beats_the_uniform_model(trained, corpus):
    tokenizer = trained["bpe"]
    settings = language_model.LMSettings(steps=12, batch_size=8, seq_len=32, learning_rate=1e-2, eval_bytes=3000,
                                         model=SMALL_LM)
    result = language_model.bits_per_byte(tokenizer, corpus[0], corpus[1], settings)
    uniform = result["heldout_scored_tokens"] * math.log2(400) / result["heldout_bytes"]
    assert math.isfinite(result["bits_per_byte"]) and result["bits_per_byte"] < uniform
    assert result["lm_train_tokens"] == 12 * 8 * 32
    assert result["lm_train_bytes"] > result["lm_train_tokens"]  # BPE tokens hold more than a byte each


# ---- recommendation --------------------------------------------------------------------------------------------------
def test_knee_finds_diminishing_returns():
    sizes = [1000, 2000, 4000, 8000, 16000, 32000]
    assert report.knee(sizes, [2.0, 3.5, 3.6, 3.65, 3.7, 3.72]) == 2000  # the big gain is the first doubling
    assert report.knee(sizes, [2.0, 3.0, 3.5, 3.7, 3.8, 3.85]) == 4000  # normalised gaps .34 .41 .32: farthest at 4000
    assert report.knee(sizes, [1, 2, 3, 4, 5, 6]) is None  # linear in log2(size): no knee
    assert report.knee(sizes[:2], [2.0, 3.0]) is None


def _row(algorithm, size, bytes_per_token, rare, unk=0.0, bpb=None):
    return {"algorithm": algorithm, "requested_size": size, "vocab_size": size, "bytes_per_token": bytes_per_token,
            "rare_token_count": rare, "unk_per_byte": unk, "renyi_efficiency": 0.5, "embedding_params": size * 10,
            "embedding_share": size / 1e5, "bits_per_byte": bpb, "reached": True}


def test_recommend_uses_the_knee_capped_by_rare_tokens_then_bits_per_byte():
    rows = [_row("bpe", s, b, r) for s, b, r in [(1000, 2.0, 900), (2000, 3.0, 400), (4000, 3.5, 150), (8000, 3.7, 50)]]
    rows += [_row("wordpiece", s, b, r, unk=0.01) for s, b, r in [(1000, 2.5, 900), (2000, 3.6, 400), (4000, 4, 150)]]
    choice = report.recommend(rows)
    assert (choice["algorithm"], choice["vocab_size"]) == ("bpe", 2000)  # knee at 2000; wordpiece set aside (unknowns)
    assert any("unknown rate" in reason for reason in choice["reasons"])
    assert report.recommend(rows, min_token_count=500)["vocab_size"] == 1000  # the rare-token cap bites first
    for row, bpb in zip(rows[:4], [1.30, 1.20, 1.195, 1.25]):
        row["bits_per_byte"] = bpb
    choice = report.recommend(rows)
    assert (choice["vocab_size"], choice["basis"]) == (2000, "bits per byte")  # within 1% of the best, cheaper


# ---- the whole sweep -------------------------------------------------------------------------------------------------
def test_sweep_end_to_end_with_bits_per_byte(tmp_path, capsys):
    from transformers import AutoTokenizer

    from hf_xarch.cli import main as cli_main

    out = tmp_path / "sweep"
    code = cli_main([
        "vocab-sweep", "--max-bytes", "60000", "--algorithms", "bpe,unigram", "--sizes", "300,400", "--output-dir",
        str(out), "--quiet", "--train-steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-bytes", "1000",
        "--lm", *[f"{key}={value}" for key, value in SMALL_LM.items()],
        "--target", "hidden_size=64", "num_hidden_layers=2", "num_attention_heads=4", "--jobs", "2",
    ])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "recommended:" in printed and "bits/byte" in printed
    result = json.loads((out / "results.json").read_text())
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert math.isfinite(row["bits_per_byte"]) and row["bits_per_byte"] > 0
        assert row["lm_train_tokens"] == 2 * 4 * 16
        assert AutoTokenizer.from_pretrained(row["tokenizer_path"]).vocab_size == row["vocab_size"]
    assert result["recommendation"]["basis"] == "bits per byte"
    for name in ("overview", "bytes_per_token", "bits_per_byte_vs_params"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert (out / "results.csv").read_text().count("\n") == 5
    markdown = (out / "results.md").read_text()
    assert "## Recommendation" in markdown and "not comparable across vocabularies" in markdown


def test_sweep_reports_unreachable_sizes_or_keeps_them_marked(tmp_path):
    text = tmp_path / "small.txt"
    text.write_text("".join(f"line {i} of a small corpus: the cat sat on mat {i % 7}\n" for i in range(200)))
    config = {"corpus": [str(text)], "algorithms": ["bpe"], "sizes": [300, 5000], "output_dir": str(tmp_path / "o"),
                  "progress": False, "plots": False}
    with pytest.raises(ValueError, match=r"bpe cannot reach 5000 tokens .* stopped at \d+ tokens"):
        run_sweep(SweepConfig(**config))
    result = run_sweep(SweepConfig(**config, skip_unreachable=True))
    marked = [row for row in result["rows"] if not row["reached"]]
    assert len(marked) == 1 and marked[0]["requested_size"] == 5000 and marked[0]["vocab_size"] < 5000


def test_sweep_measures_out_of_domain_text(tmp_path):
    ood = tmp_path / "ood.txt"
    ood.write_text("Ελληνικά κείμενα και 日本語のテキスト, def f(x): return x\n" * 20)
    result = run_sweep(SweepConfig(max_bytes=40_000, algorithms=["wordpiece", "unigram"], sizes=[400], ood=[str(ood)],
                                   output_dir=str(tmp_path / "o"), progress=False, plots=False))
    rows = {row["algorithm"]: row for row in result["rows"]}
    assert rows["wordpiece"]["ood_unk_per_byte"] > 0.1  # Greek and Japanese: characters it never saw
    assert rows["unigram"]["ood_unk_per_byte"] == 0.0  # spelled as bytes instead
    assert rows["unigram"]["ood_bytes_per_token"] < rows["unigram"]["bytes_per_token"]
    assert "OOD unk/byte" in (tmp_path / "o" / "results.md").read_text()


def test_sweep_rejects_empty_small_and_unknown_inputs(tmp_path, capsys):
    from hf_xarch.cli import main as cli_main

    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n" * 10)
    cases = [
        (["--corpus", str(empty)], "is empty"),
        (["--corpus", str(tiny)], "too small"),
        (["--algorithms", "bpe,bytepiece"], "bytepiece"),
        (["--sizes", "1000,lots"], "sizes="),
        (["nonsense=1"], "unknown settings"),
        (["--corpus", "no-such-user/no-such-dataset"], "could not be loaded as a Hub dataset"),  # offline in tests
    ]
    for argv, message in cases:
        assert cli_main(["vocab-sweep", *argv, "--output-dir", str(tmp_path / "o"), "--quiet"]) == 2
        assert message in capsys.readouterr().err


def test_yaml_config_and_overrides(tmp_path):
    config = config_from_args(["--config", str(REPO / "recipes/configs/vocab_sweep.yaml")])
    assert config.sizes == [1000, 2000, 4000, 8000, 16000, 32000] and config.algorithms == ["bpe", "wordpiece", "unigram"]
    assert config.target["hidden_size"] == 512
    config = config_from_args([
        "--config", str(REPO / "recipes/configs/vocab_sweep.yaml"), "--sizes", "2k,1k", "--target", "hidden_size=64",
        "--", "train_steps=5", "lm.num_hidden_layers=3",  # "--" ends --target's list of pairs
    ])
    assert config.sizes == [1000, 2000] and config.train_steps == 5
    assert config.target["hidden_size"] == 64 and config.target["num_hidden_layers"] == 8
    assert config.lm["num_hidden_layers"] == 3 and config.lm["hidden_size"] == 128


def test_recipe_script_hands_over_to_the_library(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vocab_sweep.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "recipes" / "vocab_sweep.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert "--train-steps" in capsys.readouterr().out


def test_sweep_progress_is_one_bar_counting_tokenizers(tmp_path, capsys):
    """One bar (two redrawn from one loop tangled), counting tokenizers: its rate must not read as tokens per second."""
    from hf_xarch.vocab.sweep import train_and_measure

    documents = [f"line {i} of a small corpus: the cat sat on the mat {i % 7}\n" * 5 for i in range(200)]
    config = SweepConfig(corpus=["unused"], algorithms=["bpe", "wordpiece"], sizes=[300, 350], progress=True,
                         skip_unreachable=True, plots=False, output_dir=str(tmp_path / "o"))
    measured = train_and_measure(config, documents[:150], documents[150:], None)
    assert len(measured) == 4
    shown = capsys.readouterr().err
    final = shown.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("tokenizers trained and measured: 100%") and "4/4" in final and "trained 4/4" in final
    assert "tokenizer/s" in shown or "s/tokenizer" in shown
    assert "tok/s" not in shown and "measuring held-out" not in shown
