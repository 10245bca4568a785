"""RoBERTa (Liu et al. 2019) and XLM-RoBERTa (Conneau et al. 2020) <-> XArch.

Both are BERT (see ``bert.py``) with fairseq's positions: real tokens are numbered from ``pad_token_id + 1`` and every
padding token takes position ``pad_token_id``. In XArch terms that is BERT's config plus
``position_offset=pad_token_id + 1``; the position table is kept whole, so the round trip gives back every row.
The weights are BERT's table under the ``roberta.`` prefix, with RoBERTa's own heads.

- Padding: RoBERTa finds it from ``input_ids == pad_token_id``, XArch from ``attention_mask``; with a tokenizer's
  ``input_ids`` and ``attention_mask`` (they agree) every position, padding included, gets the same id, left- or
  right-padded.
- The MLM head always uses gelu (XArch's uses ``hidden_act``), so only ``hidden_act="gelu"`` converts with it.
- ``RobertaForSequenceClassification``'s head (dropout, dense, tanh, dropout, out_proj on ``<s>``) is XArch's pooler
  and classifier: identical in eval mode, one dropout fewer in training (warned at conversion).
- ``RobertaForCausalLM`` (``is_decoder=True``) does not convert: only the encoder does.

``roberta_converter`` builds the converter of any such family from its config table and weight table; Longformer
(``longformer.py``) is one with sliding-window layers.
"""

from __future__ import annotations

from dataclasses import replace

from transformers import RobertaConfig, XLMRobertaConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from . import bert
from .base import (
    ENCODER_HEADS,
    Converter,
    StateDict,
    check_no_layer_sharing,
    check_xarch_config,
    heads,
    register_converter,
    rename,
    unsupported,
)
from .fields import ConfigTable, fold_shared_bias, unfold_shared_bias, warn_extra_dropout, window_problems


def weight_table(prefix: str) -> list[tuple[str, str]]:
    """BERT's encoder under ``prefix`` (``roberta.``); its ``cls.`` MLM head is RoBERTa's ``lm_head.``. ``{i}`` is the
    layer, ``{p}`` weight or bias."""
    encoder = [(hf.replace("bert.", prefix, 1), xarch) for hf, xarch in bert.TABLE if not hf.startswith("cls.")]
    return encoder + [
        ("lm_head.dense.{p}", "lm_head.dense.{p}"),
        ("lm_head.layer_norm.{p}", "lm_head.norm.{p}"),
        ("lm_head.decoder.{p}", "lm_head.decoder.{p}"),
    ]


TABLE = weight_table("roberta.")
# RobertaClassificationHead: dense -> tanh -> out_proj on the first token = XArch's pooler -> classifier
SEQUENCE_HEAD = [("classifier.dense.{p}", "pooler.dense.{p}"), ("classifier.out_proj.{p}", "classifier.{p}")]
SHARED_BIAS = ("lm_head.bias", "lm_head.decoder.bias")  # RobertaLMHead keeps its output bias under both names


def sequence_table(table: list[tuple[str, str]], hf_class_name: str) -> list[tuple[str, str]]:
    """The weight table of one head: a sequence classifier reads XArch's pooler as its ``classifier.dense``."""
    if hf_class_name.endswith("ForSequenceClassification"):
        return SEQUENCE_HEAD + [pair for pair in table if pair[1] not in ("pooler.dense.{p}", "classifier.{p}")]
    return table


def roberta_converter(
    model_type: str,
    family: str,
    class_prefix: str,
    fields: ConfigTable,
    table: list[tuple[str, str]] = TABLE,
    suffixes: tuple[str, ...] = ENCODER_HEADS,
    sliding: bool = False,
) -> Converter:
    """The converter of one fairseq-positioned BERT (``RobertaForMaskedLM``, ``XLMRobertaForMaskedLM``, ...) whose
    config is ``fields`` and whose weights are ``table``; ``sliding``: every layer is sliding-window attention
    (Longformer's ``attention_window``, a field of ``fields``)."""
    layer_type, options = ("sliding_attention", {"attention_type": "sliding_window"}) if sliding else ("full_attention", {})

    def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
        problems = bert.encoder_problems(hf_config, hf_class_name, family, f"{class_prefix}ForCausalLM")
        if hf_config.pad_token_id is None:
            problems.append(f"pad_token_id=None: {family} numbers positions from pad_token_id + 1")
        act = hf_config.hidden_act
        if hf_class_name.endswith("ForMaskedLM") and isinstance(act, str) and act != "gelu":
            problems.append(f"hidden_act={act!r}: {family}'s LM head always uses gelu, XArch's "
                            "uses hidden_act, so they agree only for 'gelu'")
        unsupported(family, problems)
        if hf_class_name.endswith("ForSequenceClassification"):
            dropout = getattr(hf_config, "classifier_dropout", None)
            warn_extra_dropout(hf_class_name, hf_config.hidden_dropout_prob if dropout is None else dropout)
        return fields.to_xarch(
            hf_config, position_offset=hf_config.pad_token_id + 1, classifier_pooling="first", **options
        )

    def config_to_hf(config: XArchConfig, hf_class_name: str) -> PreTrainedConfig:
        required = bert.required_fields(fields, hf_class_name, position_offset=(config.pad_token_id or 0) + 1)
        if hf_class_name.endswith("ForMaskedLM"):
            required["hidden_act"] = "gelu"
        problems = check_xarch_config(config, family, required, layer_type) + check_no_layer_sharing(config, family)
        if sliding:
            problems += window_problems(config, family)
        if config.pad_token_id is None:
            problems.append(f"XArchConfig.pad_token_id=None: {family} numbers positions from pad_token_id + 1")
        if config.type_vocab_size == 0:
            problems.append(f"XArchConfig.type_vocab_size=0: {family} always adds a token-type embedding")
        unsupported("XArch", problems)
        return fields.to_hf(config)

    def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
        return rename(fold_shared_bias(state_dict, *SHARED_BIAS), sequence_table(table, hf_class_name))

    def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
        renamed = rename(state_dict, sequence_table(table, hf_class_name), reverse=True)
        return unfold_shared_bias(renamed, *SHARED_BIAS)

    return Converter(
        model_type,
        heads(class_prefix, *suffixes),
        config_from_hf,
        state_dict_from_hf,
        config_to_hf,
        state_dict_to_hf,
        **bert.without_pooler(class_prefix + "Model"),
    )


# BERT's config table, read into and written from RoBERTa's config classes
ROBERTA = register_converter(
    roberta_converter("roberta", "RoBERTa", "Roberta", replace(bert.FIELDS, hf_config_class=RobertaConfig))
)
XLM_ROBERTA = register_converter(
    roberta_converter(
        "xlm-roberta", "XLM-RoBERTa", "XLMRoberta", replace(bert.FIELDS, hf_config_class=XLMRobertaConfig)
    )
)
