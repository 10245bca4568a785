"""BERT (Devlin et al. 2019) <-> XArch.

BERT is a post-norm encoder: ``LayerNorm(x + Attention(x))`` then ``LayerNorm(h + MLP(h))``, with learned absolute
positions, token-type (segment) embeddings and a LayerNorm on the embeddings, no final norm. In XArch terms:
``norm_position="post"``, ``final_norm=False``, ``embedding_norm=True``, ``position_embedding_type="learned"``,
``type_vocab_size=config.type_vocab_size``, every norm with ``layer_norm_eps``. The MLM head (dense, activation,
LayerNorm, decoder tied to the word embeddings, one output bias) is ``XArchMLMHead``; the pooler (tanh(W h[CLS]))
is ``XArchPooler`` with ``classifier_pooling="first"``.

The config is ``FIELDS`` (BertConfig's vocabulary ``fields.BERT_FIELDS`` over BERT's shape
``fields.POST_NORM_ENCODER``) and the weights are ``TABLE``, both read in both directions; RoBERTa, XLM-RoBERTa,
Longformer and ALBERT build on them and on the helpers here.

Positions: BERT numbers positions 0..n-1 whatever the mask, XArch skips padding on the left. With right padding (how
BERT is used) both agree at every real token; pass ``position_ids`` to reproduce BERT on left-padded batches too.
"""

from __future__ import annotations

import torch
from transformers import BertConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    ENCODER_HEADS,
    Converter,
    StateDict,
    activation_problems,
    check_no_layer_sharing,
    check_xarch_config,
    heads,
    qa_problems,
    register_converter,
    rename,
    unsupported,
)
from .fields import BERT_FIELDS, POST_NORM_ENCODER, ConfigTable, fold_shared_bias, unfold_shared_bias

HEADS = heads("Bert", *ENCODER_HEADS)

# (transformers key, XArch key); `{i}` is the layer, `{p}` weight or bias
TABLE = [
    ("bert.embeddings.word_embeddings.weight", "model.embeddings.word_embeddings.weight"),
    ("bert.embeddings.position_embeddings.weight", "model.embeddings.position_embeddings.weight"),
    ("bert.embeddings.token_type_embeddings.weight", "model.embeddings.token_type_embeddings.weight"),
    ("bert.embeddings.LayerNorm.{p}", "model.embeddings.norm.{p}"),
    ("bert.encoder.layer.{i}.attention.self.query.{p}", "model.layers.{i}.attention.q_proj.{p}"),
    ("bert.encoder.layer.{i}.attention.self.key.{p}", "model.layers.{i}.attention.k_proj.{p}"),
    ("bert.encoder.layer.{i}.attention.self.value.{p}", "model.layers.{i}.attention.v_proj.{p}"),
    ("bert.encoder.layer.{i}.attention.output.dense.{p}", "model.layers.{i}.attention.o_proj.{p}"),
    ("bert.encoder.layer.{i}.attention.output.LayerNorm.{p}", "model.layers.{i}.attention_norm.{p}"),
    ("bert.encoder.layer.{i}.intermediate.dense.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("bert.encoder.layer.{i}.output.dense.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("bert.encoder.layer.{i}.output.LayerNorm.{p}", "model.layers.{i}.mlp_norm.{p}"),
    ("bert.pooler.dense.{p}", "pooler.dense.{p}"),
    ("cls.predictions.transform.dense.{p}", "lm_head.dense.{p}"),
    ("cls.predictions.transform.LayerNorm.{p}", "lm_head.norm.{p}"),
    ("cls.predictions.decoder.{p}", "lm_head.decoder.{p}"),
    ("classifier.{p}", "classifier.{p}"),
    ("qa_outputs.{p}", "qa_outputs.{p}"),
]
# BertForMaskedLM keeps the decoder bias twice (`cls.predictions.bias` is tied to `cls.predictions.decoder.bias`)
SHARED_BIAS = ("cls.predictions.bias", "cls.predictions.decoder.bias")

FIELDS = ConfigTable(BertConfig, (*BERT_FIELDS, ("classifier_dropout", "classifier_dropout")), POST_NORM_ENCODER)


def encoder_problems(hf_config: PreTrainedConfig, hf_class_name: str, family: str, decoder_class: str) -> list[str]:
    """What stops any BERT-like encoder (BERT, RoBERTa, Longformer) from converting: a decoder or cross-attention
    set in its config, an activation that is not a name, a QA head with other than two outputs."""
    problems = []
    if getattr(hf_config, "is_decoder", False):
        problems.append(f"is_decoder=True ({decoder_class}): only the {family} encoder converts")
    if getattr(hf_config, "add_cross_attention", False):
        problems.append("add_cross_attention=True: XArch has no cross-attention")
    return problems + activation_problems("hidden_act", hf_config.hidden_act) + qa_problems(hf_config, hf_class_name)


def required_fields(fields: ConfigTable, hf_class_name: str, **family_required) -> dict:
    """What ``to_hf`` needs of an XArch config for a BERT-like ``hf_class_name``: the family's fixed values, and the
    first token's pooler for a sequence classifier (BERT's tanh pooler on [CLS], RoBERTa's head on <s>)."""
    required = {**fields.fixed, **family_required}
    if hf_class_name.endswith("ForSequenceClassification"):
        required["classifier_pooling"] = "first"
    return required


def add_token_type_row(state_dict: StateDict, key: str, config: XArchConfig) -> StateDict:
    """BERT and ALBERT always have a token-type table; for a model without token types it is one zero row, which adds
    nothing (``to_hf`` sets ``type_vocab_size=1`` for it)."""
    if config.type_vocab_size == 0:
        word = state_dict[key.replace("token_type_embeddings", "word_embeddings")]
        state_dict = {**state_dict, key: torch.zeros(1, word.shape[1], dtype=word.dtype)}
    return state_dict


def without_pooler(model_class: str) -> dict:
    """The ``Converter`` options of a family whose bare ``model_class`` has a pooler (BertModel): XArchModel returns
    hidden states only, so ``from_hf`` drops it with a warning and ``to_hf`` builds ``model_class`` without one."""
    return {"droppable_prefixes": ("pooler.",), "hf_init_kwargs": {model_class: {"add_pooling_layer": False}}}


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = []
    position_type = getattr(hf_config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        problems.append(
            f"position_embedding_type={position_type!r}: XArch has BERT's learned absolute positions only "
            "('absolute'); the relative_key variants add a learned distance embedding to the attention scores"
        )
    unsupported("BERT", problems + encoder_problems(hf_config, hf_class_name, "BERT", "BertLMHeadModel"))
    return FIELDS.to_xarch(hf_config, classifier_pooling="first")


def config_to_hf(config: XArchConfig, hf_class_name: str) -> BertConfig:
    required = required_fields(FIELDS, hf_class_name)
    unsupported("XArch", check_xarch_config(config, "BERT", required) + check_no_layer_sharing(config, "BERT"))
    return FIELDS.to_hf(config, type_vocab_size=max(config.type_vocab_size, 1))  # see add_token_type_row


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    return rename(fold_shared_bias(state_dict, *SHARED_BIAS), TABLE)


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    out = unfold_shared_bias(rename(state_dict, TABLE, reverse=True), *SHARED_BIAS)
    return add_token_type_row(out, "bert.embeddings.token_type_embeddings.weight", config)


BERT = register_converter(Converter(
    "bert", HEADS, config_from_hf, state_dict_from_hf, config_to_hf, state_dict_to_hf, **without_pooler("BertModel")
))
