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
"""

from __future__ import annotations

from transformers import RobertaConfig, XLMRobertaConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from . import bert
from .base import (
    Converter,
    StateDict,
    check_no_layer_sharing,
    check_xarch_config,
    register_converter,
    rename,
    unsupported,
)
from .fields import POST_NORM_ENCODER, ConfigTable, fold_shared_bias, unfold_shared_bias, warn_extra_dropout

HEAD_SUFFIXES = {
    "Model": "XArchModel",
    "ForMaskedLM": "XArchForMaskedLM",
    "ForSequenceClassification": "XArchForSequenceClassification",
    "ForTokenClassification": "XArchForTokenClassification",
    "ForQuestionAnswering": "XArchForQuestionAnswering",
}

# BERT's encoder under RoBERTa's prefix (its `cls.` MLM head is RoBERTa's `lm_head.`); `{i}` layer, `{p}` weight/bias
TABLE = [(hf.replace("bert.", "roberta.", 1), xarch) for hf, xarch in bert.TABLE if not hf.startswith("cls.")] + [
    ("lm_head.dense.{p}", "lm_head.dense.{p}"),
    ("lm_head.layer_norm.{p}", "lm_head.norm.{p}"),
    ("lm_head.decoder.{p}", "lm_head.decoder.{p}"),
]
# RobertaClassificationHead: dense -> tanh -> out_proj on the first token = XArch's pooler -> classifier
SEQUENCE_HEAD = [("classifier.dense.{p}", "pooler.dense.{p}"), ("classifier.out_proj.{p}", "classifier.{p}")]
SHARED_BIAS = ("lm_head.bias", "lm_head.decoder.bias")  # RobertaLMHead keeps its output bias under both names

# BertConfig's vocabulary, which RobertaConfig and XLMRobertaConfig share
ENCODER_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_hidden_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("intermediate_size", "intermediate_size"),
    ("hidden_act", "hidden_act"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("type_vocab_size", "type_vocab_size"),
    ("layer_norm_eps", "norm_eps"),
    ("hidden_dropout_prob", "hidden_dropout"),
    ("attention_probs_dropout_prob", "attention_dropout"),
    ("classifier_dropout", "classifier_dropout"),
    ("initializer_range", "initializer_range"),
)


def sequence_table(hf_class_name: str) -> list[tuple[str, str]]:
    """The weight table of one head: a sequence classifier reads XArch's pooler as its ``classifier.dense``."""
    if hf_class_name.endswith("ForSequenceClassification"):
        return SEQUENCE_HEAD + [pair for pair in TABLE if pair[1] not in ("pooler.dense.{p}", "classifier.{p}")]
    return TABLE


def roberta_converter(model_type: str, family: str, class_prefix: str, config_class: type) -> Converter:
    """The converter of one fairseq-positioned BERT (``RobertaForMaskedLM``, ``XLMRobertaForMaskedLM``, ...)."""
    fields = ConfigTable(config_class, ENCODER_FIELDS, POST_NORM_ENCODER)

    def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
        problems = []
        if hf_config.is_decoder:
            problems.append(f"is_decoder=True ({class_prefix}ForCausalLM): only the {family} encoder converts")
        if getattr(hf_config, "add_cross_attention", False):
            problems.append("add_cross_attention=True: XArch has no cross-attention")
        if hf_config.pad_token_id is None:
            problems.append(f"pad_token_id=None: {family} numbers positions from pad_token_id + 1")
        if not isinstance(hf_config.hidden_act, str):
            problems.append(f"hidden_act={hf_config.hidden_act!r}: only activation names (ACT2FN keys) can be saved")
        elif hf_class_name.endswith("ForMaskedLM") and hf_config.hidden_act != "gelu":
            problems.append(f"hidden_act={hf_config.hidden_act!r}: {family}'s LM head always uses gelu, XArch's "
                            "uses hidden_act, so they agree only for 'gelu'")
        if hf_class_name.endswith("ForQuestionAnswering") and hf_config.num_labels != 2:
            problems.append(f"{hf_class_name} with num_labels={hf_config.num_labels}: XArch's QA head has 2")
        unsupported(family, problems)
        if hf_class_name.endswith("ForSequenceClassification"):
            dropout = hf_config.classifier_dropout
            warn_extra_dropout(hf_class_name, hf_config.hidden_dropout_prob if dropout is None else dropout)
        return fields.to_xarch(hf_config, position_offset=hf_config.pad_token_id + 1, classifier_pooling="first")

    def config_to_hf(config: XArchConfig, hf_class_name: str) -> PreTrainedConfig:
        required = {**POST_NORM_ENCODER, "position_offset": (config.pad_token_id or 0) + 1}
        if hf_class_name.endswith("ForSequenceClassification"):
            required["classifier_pooling"] = "first"  # the classification head reads <s>
        if hf_class_name.endswith("ForMaskedLM"):
            required["hidden_act"] = "gelu"
        problems = check_xarch_config(config, family, required) + check_no_layer_sharing(config, family)
        if config.pad_token_id is None:
            problems.append(f"XArchConfig.pad_token_id=None: {family} numbers positions from pad_token_id + 1")
        if config.type_vocab_size == 0:
            problems.append(f"XArchConfig.type_vocab_size=0: {family} always adds a token-type embedding")
        unsupported("XArch", problems)
        return fields.to_hf(config)

    def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
        return rename(fold_shared_bias(state_dict, *SHARED_BIAS), sequence_table(hf_class_name))

    def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
        return unfold_shared_bias(rename(state_dict, sequence_table(hf_class_name), reverse=True), *SHARED_BIAS)

    return Converter(
        model_type=model_type,
        heads={class_prefix + suffix: xarch for suffix, xarch in HEAD_SUFFIXES.items()},
        config_from_hf=config_from_hf,
        state_dict_from_hf=state_dict_from_hf,
        config_to_hf=config_to_hf,
        state_dict_to_hf=state_dict_to_hf,
        droppable_prefixes=("pooler.",),  # RobertaModel's pooler: XArchModel returns hidden states only
        hf_init_kwargs={class_prefix + "Model": {"add_pooling_layer": False}},
    )


ROBERTA = register_converter(roberta_converter("roberta", "RoBERTa", "Roberta", RobertaConfig))
XLM_ROBERTA = register_converter(roberta_converter("xlm-roberta", "XLM-RoBERTa", "XLMRoberta", XLMRobertaConfig))
