"""DistilBERT (Sanh et al. 2019) <-> XArch.

DistilBERT is BERT (see ``bert.py``) without token types and pooler, with every LayerNorm at eps 1e-12 and its own
names (``dim``, ``n_layers``, ``q_lin``, ``ffn.lin1``...). ``sinusoidal_pos_embds=True`` only fills the same learned
table with sinusoids at init, so both kinds convert as ``position_embedding_type="learned"`` (to_hf gives a
``sinusoidal_pos_embds=False`` model holding those rows: the same function).

- Positions: DistilBERT numbers positions 0..n-1 whatever the mask, XArch skips left padding; right-padded batches
  agree at every token, and ``position_ids`` reproduces DistilBERT on left-padded ones.
- ``DistilBertForQuestionAnswering`` drops out its input with ``qa_dropout``, XArch's QA head does not: identical in
  eval mode, one dropout fewer in training (warned at conversion).
- ``DistilBertForSequenceClassification`` (a ReLU pre-classifier, where XArch's pooler has tanh) does not convert.
"""

from __future__ import annotations

from transformers import DistilBertConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
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
from .fields import POST_NORM_ENCODER, ConfigTable, warn_extra_dropout

HEADS = heads("DistilBert", "Model", "ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering")

# (transformers key, XArch key); `{i}` is the layer, `{p}` weight or bias
TABLE = [
    ("distilbert.embeddings.word_embeddings.weight", "model.embeddings.word_embeddings.weight"),
    ("distilbert.embeddings.position_embeddings.weight", "model.embeddings.position_embeddings.weight"),
    ("distilbert.embeddings.LayerNorm.{p}", "model.embeddings.norm.{p}"),
    ("distilbert.transformer.layer.{i}.attention.q_lin.{p}", "model.layers.{i}.attention.q_proj.{p}"),
    ("distilbert.transformer.layer.{i}.attention.k_lin.{p}", "model.layers.{i}.attention.k_proj.{p}"),
    ("distilbert.transformer.layer.{i}.attention.v_lin.{p}", "model.layers.{i}.attention.v_proj.{p}"),
    ("distilbert.transformer.layer.{i}.attention.out_lin.{p}", "model.layers.{i}.attention.o_proj.{p}"),
    ("distilbert.transformer.layer.{i}.sa_layer_norm.{p}", "model.layers.{i}.attention_norm.{p}"),
    ("distilbert.transformer.layer.{i}.ffn.lin1.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("distilbert.transformer.layer.{i}.ffn.lin2.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("distilbert.transformer.layer.{i}.output_layer_norm.{p}", "model.layers.{i}.mlp_norm.{p}"),
    ("vocab_transform.{p}", "lm_head.dense.{p}"),
    ("vocab_layer_norm.{p}", "lm_head.norm.{p}"),
    ("vocab_projector.{p}", "lm_head.decoder.{p}"),
    ("classifier.{p}", "classifier.{p}"),
    ("qa_outputs.{p}", "qa_outputs.{p}"),
]

FIELDS = ConfigTable(
    DistilBertConfig,
    renamed=(
        ("vocab_size", "vocab_size"),
        ("dim", "hidden_size"),
        ("n_layers", "num_hidden_layers"),
        ("n_heads", "num_attention_heads"),
        ("hidden_dim", "intermediate_size"),
        ("activation", "hidden_act"),
        ("max_position_embeddings", "max_position_embeddings"),
        ("dropout", "hidden_dropout"),
        ("attention_dropout", "attention_dropout"),
        ("initializer_range", "initializer_range"),
    ),
    # BERT's shape without token types; every LayerNorm's eps is fixed in DistilBERT's code, not in its config
    fixed={**POST_NORM_ENCODER, "type_vocab_size": 0, "norm_eps": 1e-12},
)


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    unsupported("DistilBERT", activation_problems("activation", hf_config.activation) + qa_problems(hf_config, hf_class_name))
    if hf_class_name == "DistilBertForQuestionAnswering":
        warn_extra_dropout(hf_class_name, hf_config.qa_dropout)
    return FIELDS.to_xarch(hf_config)


def config_to_hf(config: XArchConfig, hf_class_name: str) -> DistilBertConfig:
    problems = check_xarch_config(config, "DistilBERT", FIELDS.fixed) + check_no_layer_sharing(config, "DistilBERT")
    if config.classifier_dropout not in (None, config.hidden_dropout):
        problems.append(f"XArchConfig.classifier_dropout={config.classifier_dropout}: DistilBERT's token classifier "
                        f"drops out with its hidden dropout ({config.hidden_dropout})")
    unsupported("XArch", problems)
    return FIELDS.to_hf(config, qa_dropout=0.0)  # XArch's QA head has no dropout


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    return rename(state_dict, TABLE)


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    return rename(state_dict, TABLE, reverse=True)


DISTILBERT = register_converter(
    Converter("distilbert", HEADS, config_from_hf, state_dict_from_hf, config_to_hf, state_dict_to_hf)
)
