"""chrF (Popović 2015) as SacreBLEU computes it, as an `evaluate` metric.

Same inputs, defaults and output keys as the Hub's ``chrf`` metric: character n-grams of orders 1-6 with whitespace
removed (``word_order`` > 0 adds word n-grams: chrF++, Popović 2017), statistics summed over the corpus, precision and
recall averaged over the orders that occur, then their F-beta with beta 2 (recall weighs twice); with several
references, each sentence counts the one that scores it best. Scores are in 0-100. Standard library only, so it
loads and runs offline without the ``sacrebleu`` package.
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "chrF: F-beta of character n-gram precision and recall (orders 1-6), over the corpus."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the translations or summaries, one string each.
    references (`list` of `list` of `str`, or `list` of `str`): the reference(s) of each prediction.
    char_order (`int`, defaults to 6), word_order (`int`, defaults to 0; 2 gives chrF++), beta (`int`, defaults to 2).
    lowercase (`bool`, defaults to False), whitespace (`bool`, defaults to False: spaces are not characters).
Returns:
    score (`float`, 0-100), char_order, word_order, beta.
"""
_CITATION = """@inproceedings{popovic-2015-chrf, title = "chr{F}: character n-gram {F}-score for automatic {MT}
evaluation", author = "Popovi{\\'c}, Maja", booktitle = "Proceedings of the Tenth Workshop on Statistical Machine
Translation", year = "2015"}"""

_PUNCTUATION = set(string.punctuation)


def char_ngrams(text: str, order: int, whitespace: bool) -> list[Counter]:
    if not whitespace:
        text = re.sub(r"\s+", "", text)
    return [Counter(text[i : i + n] for i in range(len(text) - n + 1)) for n in range(1, order + 1)]


def split_punctuation(text: str) -> list[str]:
    """chrF++'s words: a punctuation mark at either end of a word is a word of its own."""
    words = []
    for word in text.split():
        if len(word) > 1 and word[-1] in _PUNCTUATION:
            words += [word[:-1], word[-1]]
        elif len(word) > 1 and word[0] in _PUNCTUATION:
            words += [word[0], word[1:]]
        else:
            words.append(word)
    return words


def word_ngrams(text: str, order: int) -> list[Counter]:
    words = split_punctuation(text)
    return [Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)) for n in range(1, order + 1)]


def statistics(hypothesis: list[Counter], reference: list[Counter]) -> list[int]:
    """(hypothesis n-grams, reference n-grams, matches) per order, flat."""
    stats = []
    for hyp, ref in zip(hypothesis, reference):
        stats += [sum(hyp.values()), sum(ref.values()), sum((hyp & ref).values())]
    return stats


def f_score(stats: list[int], beta: float) -> float:
    precision = recall = 0.0
    orders = 0
    for n_hyp, n_ref, n_match in zip(stats[0::3], stats[1::3], stats[2::3]):
        if n_hyp > 0 and n_ref > 0:  # orders longer than a sentence are left out of the averages
            precision += n_match / n_hyp
            recall += n_match / n_ref
            orders += 1
    if orders == 0:
        return 0.0
    precision, recall = precision / orders, recall / orders
    if precision + recall == 0:
        return 0.0
    factor = beta**2
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


def corpus_chrf(predictions, references, char_order=6, word_order=0, beta=2, lowercase=False, whitespace=False):
    def grams(text):
        text = text.lower() if lowercase else text
        return char_ngrams(text, char_order, whitespace) + (word_ngrams(text, word_order) if word_order else [])

    total = [0] * (3 * (char_order + word_order))
    for prediction, refs in zip(predictions, references):
        hypothesis = grams(prediction)
        best, best_score = None, -1.0
        for ref in refs:
            stats = statistics(hypothesis, grams(ref))
            score = f_score(stats, beta)
            if score > best_score:
                best, best_score = stats, score
        total = [a + b for a, b in zip(total, best)]
    return {"score": f_score(total, beta), "char_order": char_order, "word_order": word_order, "beta": beta}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False,
                 whitespace=False):
        references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
        if any(not refs for refs in references):
            raise ValueError("references: every prediction needs at least one reference")
        return corpus_chrf(predictions, references, char_order, word_order, beta, lowercase, whitespace)
