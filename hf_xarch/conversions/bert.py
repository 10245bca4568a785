"""BERT (Devlin et al. 2019) <-> XArch.

BERT is a post-norm encoder: ``LayerNorm(x + Attention(x))`` then ``LayerNorm(h + MLP(h))``, with learned absolute
positions, token-type (segment) embeddings and a LayerNorm on the embeddings, no final norm. In XArch terms:
``norm_position="post"``, ``final_norm=False``, ``embedding_norm=True``, ``position_embedding_type="learned"``,
``type_vocab_size=config.type_vocab_size``, every norm with ``layer_norm_eps``. The MLM head (dense, activation,
LayerNorm, decoder tied to the word embeddings, one output bias) is ``XArchMLMHead``; the pooler (tanh(W h[CLS]))
is ``XArchPooler`` with ``classifier_pooling="first"``.

Positions: BERT numbers positions 0..n-1 whatever the mask, XArch skips padding on the left. With right padding (how
BERT is used) both agree at every real token; pass ``position_ids`` to reproduce BERT on left-padded batches too.
"""

from __future__ import annotations

import torch
from transformers import BertConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    Converter,
    StateDict,
    check_no_layer_sharing,
    check_xarch_config,
    register_converter,
    rename,
    shared_config_kwargs,
    shared_hf_kwargs,
    unsupported,
)

HEADS = {
    "BertModel": "XArchModel",
    "BertForMaskedLM": "XArchForMaskedLM",
    "BertForSequenceClassification": "XArchForSequenceClassification",
    "BertForTokenClassification": "XArchForTokenClassification",
    "BertForQuestionAnswering": "XArchForQuestionAnswering",
}

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
SHARED_BIAS = "cls.predictions.bias"


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = []
    position_type = getattr(hf_config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        problems.append(
            f"position_embedding_type={position_type!r}: XArch has BERT's learned absolute positions only "
            "('absolute'); the relative_key variants add a learned distance embedding to the attention scores"
        )
    if hf_config.is_decoder:
        problems.append("is_decoder=True (BERT as a causal decoder, BertLMHeadModel): only the BERT encoder converts")
    if getattr(hf_config, "add_cross_attention", False):
        problems.append("add_cross_attention=True: XArch has no cross-attention")
    if not isinstance(hf_config.hidden_act, str):
        problems.append(f"hidden_act={hf_config.hidden_act!r}: only activation names (ACT2FN keys) can be saved")
    if hf_class_name == "BertForQuestionAnswering" and hf_config.num_labels != 2:
        problems.append(f"BertForQuestionAnswering with num_labels={hf_config.num_labels}: XArch's QA head has 2")
    unsupported("BERT", problems)
    return XArchConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        hidden_act=hf_config.hidden_act,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        is_decoder=False,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="post",
        norm_eps=hf_config.layer_norm_eps,
        final_norm=False,
        embedding_norm=True,
        mlp_type="plain",
        attention_bias=True,
        mlp_bias=True,
        hidden_dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        classifier_dropout=hf_config.classifier_dropout,
        classifier_pooling="first",
        initializer_range=hf_config.initializer_range,
        **shared_config_kwargs(hf_config),
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    state_dict = dict(state_dict)
    shared_bias = state_dict.pop(SHARED_BIAS, None)
    if shared_bias is not None:
        state_dict.setdefault("cls.predictions.decoder.bias", shared_bias)
    return rename(state_dict, TABLE)


def config_to_hf(config: XArchConfig, hf_class_name: str) -> BertConfig:
    required = dict(
        is_decoder=False,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="post",
        final_norm=False,
        embedding_norm=True,
        mlp_type="plain",
        attention_bias=True,
        mlp_bias=True,
    )
    if hf_class_name == "BertForSequenceClassification":
        required["classifier_pooling"] = "first"  # BERT classifies through the tanh pooler on [CLS]
    problems = check_xarch_config(config, "BERT", required) + check_no_layer_sharing(config, "BERT")
    unsupported("XArch", problems)
    return BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings,
        # BERT always has a token-type table; one zero row adds nothing, as a model without token types
        type_vocab_size=max(config.type_vocab_size, 1),
        initializer_range=config.initializer_range,
        layer_norm_eps=config.norm_eps,
        classifier_dropout=config.classifier_dropout,
        **shared_hf_kwargs(config),
    )


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    out = rename(state_dict, TABLE, reverse=True)
    if config.type_vocab_size == 0:
        word = out["bert.embeddings.word_embeddings.weight"]
        out["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, word.shape[1], dtype=word.dtype)
    if "cls.predictions.decoder.bias" in out:
        out[SHARED_BIAS] = out["cls.predictions.decoder.bias"]
    return out


BERT = register_converter(
    Converter(
        model_type="bert",
        heads=HEADS,
        config_from_hf=config_from_hf,
        state_dict_from_hf=state_dict_from_hf,
        config_to_hf=config_to_hf,
        state_dict_to_hf=state_dict_to_hf,
        droppable_prefixes=("pooler.",),  # BertModel's pooler: XArchModel returns hidden states only
        hf_init_kwargs={"BertModel": {"add_pooling_layer": False}},
    )
)
