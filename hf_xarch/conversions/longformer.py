"""Longformer (Beltagy et al. 2020) <-> XArch.

Longformer is RoBERTa (see ``roberta.py``) with sliding-window attention: per-layer ``attention_window`` (w/2 keys on
each side) and separate projections for the rows of global tokens (``query_global``/``key_global``/``value_global``).
In XArch terms: RoBERTa's config plus ``attention_type="sliding_window"``, ``attention_window`` and
``global_projections=True``; RoBERTa's weights plus the global projections.

- Positions: as RoBERTa's, ``position_offset=pad_token_id + 1``; the position table is kept whole, so the round trip
  gives back every row. Both count real tokens only, so left- and right-padded batches agree.
- Lengths that are not a multiple of the window: Longformer pads to one inside the model, XArch handles any length;
  outputs at real tokens are the same.
- ``LongformerForSequenceClassification`` puts global attention on the first token when no ``global_attention_mask``
  is given; XArch never invents global tokens, so pass ``global_attention_mask`` (first token = 1) to match it.
- ``LongformerForQuestionAnswering`` (global attention on the question, found from ``sep_token_id``) does not convert.
- transformers runs Longformer eager only, so ``from_hf`` builds XArch's default (``sdpa``: the banded O(N·w) kernel),
  not XArch's eager, which is the dense reference.
"""

from __future__ import annotations

from transformers import LongformerConfig

from .base import ENCODER_HEADS, register_converter
from .fields import BERT_FIELDS, POST_NORM_ENCODER, ConfigTable
from .roberta import roberta_converter, weight_table

# BERT's fields (Longformer's classifiers drop out with hidden_dropout_prob: no classifier_dropout) and the window
FIELDS = ConfigTable(
    LongformerConfig,
    renamed=(*BERT_FIELDS, ("attention_window", "attention_window")),
    fixed={**POST_NORM_ENCODER, "global_projections": True},
)
# RoBERTa's weights under `longformer.`, and the projections of the global tokens' rows
TABLE = weight_table("longformer.") + [
    (f"longformer.encoder.layer.{{i}}.attention.self.{name}_global.{{p}}", f"model.layers.{{i}}.attention.{name}_global.{{p}}")
    for name in ("query", "key", "value")
]

LONGFORMER = register_converter(
    roberta_converter(
        "longformer",
        "Longformer",
        "Longformer",
        FIELDS,
        table=TABLE,
        suffixes=tuple(suffix for suffix in ENCODER_HEADS if suffix != "ForQuestionAnswering"),
        sliding=True,
    )
)
