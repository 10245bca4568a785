"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum (Lin 2004) as Google's ``rouge_score`` computes them, as an `evaluate`
metric.

Same inputs and output keys as the Hub's ``rouge`` metric: ``rouge_score``'s tokenizer (lowercase, every run of
characters other than ``a-z0-9`` is a separator, so non-ASCII letters are dropped; no stemming), F-measure of n-gram
overlap (ROUGE-N), of the longest common subsequence (ROUGE-L), and of the union LCS over the text's lines
(ROUGE-Lsum: put one sentence per line). With several references a prediction takes the best-scoring one. The
aggregate is the mean F-measure over predictions (the Hub's module reports the median of a random bootstrap of
that mean instead, which is not reproducible); ``use_aggregator=False`` gives one score per prediction. Standard
library only, so it loads and runs offline without ``rouge_score``.
"""

import re
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "ROUGE: F-measure of unigram, bigram and longest-common-subsequence overlap with the reference."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the summaries, one string each (sentences on separate lines for rougeLsum).
    references (`list` of `list` of `str`, or `list` of `str`): the reference(s) of each prediction.
    rouge_types (`list` of `str`, defaults to ["rouge1", "rouge2", "rougeL", "rougeLsum"]): "rouge<N>" for any N,
        "rougeL", "rougeLsum".
    use_aggregator (`bool`, defaults to True): the mean over predictions; False: a list, one score per prediction.
Returns:
    one F-measure (0-1) per rouge type.
"""
_CITATION = """@inproceedings{lin-2004-rouge, title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
author = "Lin, Chin-Yew", booktitle = "Text Summarization Branches Out", year = "2004"}"""

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def tokenize(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def f_measure(matches: int, predicted: int, reference: int) -> float:
    precision = matches / predicted if predicted else 0.0
    recall = matches / reference if reference else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n(prediction: list[str], reference: list[str], n: int) -> float:
    pred = Counter(tuple(prediction[i : i + n]) for i in range(len(prediction) - n + 1))
    ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
    return f_measure(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table


def lcs_positions(reference: list[str], candidate: list[str]) -> list[int]:
    """Positions in `reference` of one longest common subsequence (rouge_score's backtrack, so ties break alike)."""
    table, positions = lcs_table(reference, candidate), []
    i, j = len(reference), len(candidate)
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            positions.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return positions[::-1]


def rouge_l(prediction: list[str], reference: list[str]) -> float:
    return f_measure(lcs_table(reference, prediction)[-1][-1], len(prediction), len(reference))


def rouge_lsum(prediction: str, reference: str) -> float:
    """Summary-level LCS: each reference line's union LCS with all predicted lines, each token counted at most as
    often as it occurs on both sides."""
    predicted = [tokens for tokens in map(tokenize, prediction.split("\n")) if tokens]
    referenced = [tokens for tokens in map(tokenize, reference.split("\n")) if tokens]
    left_pred = Counter(token for line in predicted for token in line)
    left_ref = Counter(token for line in referenced for token in line)
    total_pred, total_ref = sum(left_pred.values()), sum(left_ref.values())
    hits = 0
    for line in referenced:
        union = sorted(set().union(*(lcs_positions(line, candidate) for candidate in predicted)))
        for token in (line[i] for i in union):
            if left_pred[token] > 0 and left_ref[token] > 0:
                hits += 1
                left_pred[token] -= 1
                left_ref[token] -= 1
    return f_measure(hits, total_pred, total_ref)


def score(prediction: str, reference: str, rouge_type: str) -> float:
    if rouge_type == "rougeLsum":
        return rouge_lsum(prediction, reference)
    if rouge_type == "rougeL":
        return rouge_l(tokenize(prediction), tokenize(reference))
    return rouge_n(tokenize(prediction), tokenize(reference), int(rouge_type[5:]))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
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

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True):
        rouge_types = list(rouge_types or ROUGE_TYPES)
        bad = [name for name in rouge_types
               if name not in ("rougeL", "rougeLsum") and not re.fullmatch(r"rouge[1-9][0-9]*", name)]
        if bad:
            raise ValueError(f"rouge_types {bad} are not allowed: 'rouge<N>' (N >= 1), 'rougeL' or 'rougeLsum'")
        references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
        if any(not refs for refs in references):
            raise ValueError("references: every prediction needs at least one reference")
        scores = {name: [max(score(prediction, ref, name) for ref in refs)
                         for prediction, refs in zip(predictions, references)] for name in rouge_types}
        if not use_aggregator:
            return scores
        return {name: sum(values) / len(values) if values else 0.0 for name, values in scores.items()}
