"""Fine-tuning encoder-decoders (finetune task=seq2seq): the shipped BLEU / chrF / ROUGE modules against published
values, the demo task built from the default corpus, and the recipe end to end (offline, tiny) with an exact resume."""

from __future__ import annotations

import pytest

from hf_xarch.metrics import load_metric

# SacreBLEU's README example: three system sentences, two reference streams
SACREBLEU_HYPOTHESES = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
SACREBLEU_REFERENCES = [["The dog bit the man.", "The dog had bit the man."],
                        ["It was not unexpected.", "No one was surprised."],
                        ["The man bit him first.", "The man had bitten the dog."]]
# the Hub chrf module's documented example
CHRF_PREDICTIONS = ["The relationship between cats and dogs is not exactly friendly.",
                    "a good bookshop is just a genteel black hole that knows how to read."]
CHRF_REFERENCES = [["The relationship between dogs and cats is not exactly friendly."],
                   ["A good bookshop is just a genteel Black Hole that knows how to read."]]


def test_bleu_matches_sacrebleu_published_example():
    # sacrebleu prints: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)
    result = load_metric("bleu").compute(predictions=SACREBLEU_HYPOTHESES, references=SACREBLEU_REFERENCES)
    assert result["score"] == pytest.approx(48.53, abs=0.005)
    assert [round(p, 1) for p in result["precisions"]] == [82.4, 50.0, 45.5, 37.5]
    assert (result["sys_len"], result["ref_len"]) == (17, 18) and result["bp"] == pytest.approx(0.943, abs=5e-4)


def test_bleu_smooths_zero_precisions_and_tokenizes_like_13a():
    bleu = load_metric("bleu")
    # "a b c" has no 4-gram at all: that order's precision stays 0 and corpus BLEU is 0, as in sacrebleu
    assert bleu.compute(predictions=["a b c"], references=["a b d"])["score"] == pytest.approx(0.0, abs=1e-9)
    # five tokens each, one substitution at the end: 4/5, 3/4, 2/3, 1/2 -> geometric mean, no brevity penalty
    result = bleu.compute(predictions=["the cat sat down today"], references=["the cat sat down now"])
    assert result["score"] == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # 13a splits punctuation off but keeps a decimal number whole: six tokens
    result = bleu.compute(predictions=["it costs 3.5 dollars, ok"], references=["it costs 3.5 dollars, no"])
    assert result["totals"] == [6, 5, 4, 3] and result["counts"] == [5, 4, 3, 2]
    # a zero precision is smoothed ("exp": 100 / (2 * total)) instead of zeroing the score
    result = bleu.compute(predictions=["a b x c d"], references=["a b y c d"])
    assert result["counts"] == [4, 2, 0, 0]
    assert result["precisions"] == pytest.approx([80.0, 50.0, 100 / (2 * 3), 100 / (4 * 2)])


def test_chrf_matches_published_examples():
    chrf = load_metric("chrf")
    assert chrf.compute(predictions=SACREBLEU_HYPOTHESES, references=SACREBLEU_REFERENCES)["score"] == pytest.approx(
        59.73, abs=0.005)  # sacrebleu's README: chrF2 = 59.73
    # the Hub chrf module's documented values: chrF, chrF++, chrF++ lowercased
    assert chrf.compute(predictions=CHRF_PREDICTIONS, references=CHRF_REFERENCES)["score"] == pytest.approx(
        84.64214891738334)
    assert chrf.compute(predictions=CHRF_PREDICTIONS, references=CHRF_REFERENCES, word_order=2)[
        "score"] == pytest.approx(82.87263732906315)
    assert chrf.compute(predictions=CHRF_PREDICTIONS, references=CHRF_REFERENCES, word_order=2, lowercase=True)[
        "score"] == pytest.approx(92.12853119829202)


def test_rouge_matches_hand_computed_values():
    rouge = load_metric("rouge")
    # the Hub rouge module's documented multi-reference example
    result = rouge.compute(predictions=["hello there", "general kenobi"],
                           references=[["hello", "there"], ["general kenobi", "general yoda"]])
    assert result == pytest.approx({"rouge1": 5 / 6, "rouge2": 0.5, "rougeL": 5 / 6, "rougeLsum": 5 / 6})
    # "the cat was found under the bed" vs "the cat was under the bed": unigrams 6/7 and 6/6, bigrams 4/6 and 4/5,
    # LCS 6 (all of the reference); tokens are lowercased and split at punctuation
    result = rouge.compute(predictions=["The cat was found under the bed."], references=["the cat, was under the bed"],
                           use_aggregator=False)
    assert result["rouge1"][0] == pytest.approx(2 * (6 / 7) * 1 / (6 / 7 + 1))
    assert result["rouge2"][0] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert result["rougeL"][0] == pytest.approx(result["rouge1"][0])
    # rougeLsum: the order of the lines does not matter, within a line it does (rougeL sees one sequence)
    swapped = rouge.compute(predictions=["b c\na x"], references=["a x\nb c"], rouge_types=["rougeL", "rougeLsum"])
    assert swapped["rougeLsum"] == pytest.approx(1.0) and swapped["rougeL"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rouge_types"):
        rouge.compute(predictions=["a"], references=["a"], rouge_types=["rougeX"])
