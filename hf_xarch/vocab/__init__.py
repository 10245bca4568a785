"""The tokenizer vocabulary sweep (`hf-xarch vocab-sweep`, `recipes/vocab_sweep.py`).

Train byte-level BPE, WordPiece and Unigram tokenizers at several vocabulary sizes, measure compression, unknowns,
Rényi efficiency, unused and rare tokens and the embedding cost for a target model, optionally train a small XArch LM
per tokenizer at equal compute for held-out bits per byte, and recommend an algorithm and size.

- ``algorithms``: the three tokenizer pipelines, training, saving for ``AutoTokenizer``;
- ``metrics``: the held-out text metrics and the parameter counts;
- ``language_model``: the bits-per-byte step;
- ``report``: the recommendation, tables and plots;
- ``sources``: the corpus (default corpus, local files, Hub datasets);
- ``sweep``: the orchestration and the command line (``main(argv)``).
"""

from .algorithms import ALGORITHMS, SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from .metrics import model_costs, parameter_count_formula, renyi_efficiency, text_metrics
from .report import knee, recommend
from .sweep import SweepConfig, main, run_sweep

__all__ = [
    "ALGORITHMS",
    "SPECIAL_TOKENS",
    "SweepConfig",
    "knee",
    "main",
    "model_costs",
    "parameter_count_formula",
    "recommend",
    "renyi_efficiency",
    "run_sweep",
    "save_tokenizer",
    "text_metrics",
    "train_tokenizer",
]
