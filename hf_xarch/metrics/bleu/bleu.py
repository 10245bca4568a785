"""Corpus BLEU (Papineni et al. 2002) as SacreBLEU computes it (Post 2018), as an `evaluate` metric.

Same inputs, defaults and output keys as the Hub's ``sacrebleu`` metric: the ``13a`` tokenizer (mteval-v13a, WMT's
standard), clipped n-gram counts up to 4 summed over the corpus, the closest reference length (the shorter on a tie)
for the brevity penalty, and the ``exp`` smoothing of zero precisions. Scores are in 0-100. Written with the standard
library only, so it loads and runs offline without the ``sacrebleu`` package.
"""

import math
import re
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "BLEU: geometric mean of clipped 1- to 4-gram precisions times a brevity penalty, over the corpus."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the translations or summaries, one string each.
    references (`list` of `list` of `str`, or `list` of `str`): the reference(s) of each prediction.
    lowercase (`bool`, defaults to False): compare lowercased text.
    max_order (`int`, defaults to 4): the longest n-gram.
Returns:
    score (`float`, 0-100), counts, totals and precisions (per order), bp (brevity penalty), sys_len, ref_len.
"""
_CITATION = """@inproceedings{post-2018-call, title = "A Call for Clarity in Reporting {BLEU} Scores",
author = "Post, Matt", booktitle = "Proceedings of the Third Conference on Machine Translation", year = "2018"}"""

# mteval-v13a's rules after its unescaping: punctuation and symbols apart, periods and commas apart unless inside a
# number, a dash apart after a digit
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]
_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def tokenize_13a(line: str) -> list[str]:
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, character in _ENTITIES:
        line = line.replace(entity, character)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def ngrams(tokens: list[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def closest_length(hypothesis_length: int, reference_lengths: list[int]) -> int:
    return min(reference_lengths, key=lambda length: (abs(length - hypothesis_length), length))


def corpus_bleu(predictions, references, lowercase=False, max_order=4) -> dict:
    correct, totals = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for prediction, refs in zip(predictions, references):
        prepare = (lambda text: tokenize_13a(text.lower())) if lowercase else tokenize_13a
        hypothesis = prepare(prediction)
        tokenized = [prepare(ref) for ref in refs]
        sys_len += len(hypothesis)
        ref_len += closest_length(len(hypothesis), [len(ref) for ref in tokenized])
        best = Counter()
        for ref in tokenized:
            best |= ngrams(ref, max_order)  # the most times any one reference holds each n-gram
        for gram, count in ngrams(hypothesis, max_order).items():
            totals[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, best[gram])
    precisions, smooth = [0.0] * max_order, 1.0
    for n in range(max_order):
        if totals[n] == 0:
            break
        if correct[n] == 0:  # "exp" smoothing: 1 / 2^k for the k-th zero precision
            smooth *= 2
            precisions[n] = 100.0 / (smooth * totals[n])
        else:
            precisions[n] = 100.0 * correct[n] / totals[n]
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    score = 0.0
    if any(correct):
        score = bp * math.exp(sum(math.log(p) if p > 0 else -9999999999 for p in precisions) / max_order)
    return {"score": score, "counts": correct, "totals": totals, "precisions": precisions, "bp": bp,
            "sys_len": sys_len, "ref_len": ref_len}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
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

    def _compute(self, predictions, references, lowercase=False, max_order=4):
        references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
        if any(not refs for refs in references):
            raise ValueError("references: every prediction needs at least one reference")
        return corpus_bleu(predictions, references, lowercase=lowercase, max_order=max_order)
