"""F1 score (binary, micro, macro or weighted), as an `evaluate` metric.

Same inputs, averaging names and output key as the Hub's ``f1`` metric (scikit-learn's semantics, with 0 for a
class that has no predicted and no true samples), computed with numpy so it loads and runs offline.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall), per class and averaged."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): true labels.
    labels (`list` of `int`, *optional*): the classes to score; defaults to those present in either list.
    pos_label (`int`, defaults to 1): the positive class when `average="binary"`.
    average (`str`, defaults to "binary"): "binary", "micro", "macro", "weighted" or None (one score per class).
    sample_weight (`list` of `float`, *optional*): a weight per sample.
Returns:
    f1 (`float`, or a list of floats when `average=None`).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
        weights = np.ones(len(predictions)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        allowed = ("binary", "micro", "macro", "weighted", None)
        if average not in allowed:
            raise ValueError(f"average={average!r} is not allowed: one of {list(allowed)}")
        if average == "binary":
            present = set(np.unique(np.concatenate([predictions, references])).tolist())
            if not present <= {0, 1, pos_label}:
                raise ValueError(f"average='binary' needs two classes, got {sorted(present)}; use average='macro'")
            classes = np.asarray([pos_label])
        elif labels is not None:
            classes = np.asarray(labels)
        else:
            classes = np.unique(np.concatenate([predictions, references]))
        true_pos = np.array([np.sum(weights * ((predictions == c) & (references == c))) for c in classes])
        pred_pos = np.array([np.sum(weights * (predictions == c)) for c in classes])
        real_pos = np.array([np.sum(weights * (references == c)) for c in classes])
        if average == "micro":
            denominator = pred_pos.sum() + real_pos.sum()
            return {"f1": float(2 * true_pos.sum() / denominator) if denominator else 0.0}
        denominator = pred_pos + real_pos
        per_class = np.divide(2 * true_pos, denominator, out=np.zeros(len(classes)), where=denominator > 0)
        if average is None:
            return {"f1": per_class.tolist()}
        if average == "weighted":
            total = real_pos.sum()
            return {"f1": float(np.sum(per_class * real_pos) / total) if total else 0.0}
        return {"f1": float(per_class.mean()) if len(per_class) else 0.0}
