"""Local ``evaluate`` metric modules (accuracy, f1, bleu, chrf, rouge), loadable offline, unlike metrics on the Hub.

``evaluate.load(metric_path("f1"))`` loads one. They compute with numpy or the standard library only (the Hub's
versions need scikit-learn, sacrebleu or rouge_score); bleu and chrf give sacrebleu's numbers, rouge rouge_score's.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """Path of the shipped metric module `name` (a file ``metrics/<name>/<name>.py``)."""
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"metric {name!r} is not shipped with hf_xarch; available: {available}")
    return str(path)


def load_metric(name: str):
    """``evaluate.load`` on the shipped module `name`, offline."""
    import evaluate

    return evaluate.load(metric_path(name))
