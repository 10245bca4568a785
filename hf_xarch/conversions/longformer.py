"""Longformer (Beltagy et al. 2020) <-> XArch.

Longformer is RoBERTa with sliding-window attention: a post-norm encoder with learned absolute positions, token types,
a LayerNorm on the embeddings, per-layer ``attention_window`` (w/2 keys on each side), and separate projections for
the rows of global tokens (``query_global``/``key_global``/``value_global``). In XArch terms:
``attention_type="sliding_window"``, ``global_projections=True``, ``norm_position="post"``, ``final_norm=False``,
``embedding_norm=True``, ``position_embedding_type="learned"``.

- Positions: RoBERTa numbers real tokens from ``pad_token_id + 1`` (the rows below are never used), XArch from 0;
  the table is shifted by ``pad_token_id + 1`` rows (``max_position_embeddings`` shrinks by as much). Both count real
  tokens only, so left- and right-padded batches agree.
- Lengths that are not a multiple of the window: Longformer pads to one inside the model, XArch handles any length;
  outputs at real tokens are the same.
- ``LongformerForSequenceClassification`` puts global attention on the first token when no ``global_attention_mask``
  is given; XArch never invents global tokens, so pass ``global_attention_mask`` (first token = 1) to match it.
- transformers runs Longformer with ``attn_implementation="eager"``, which ``from_hf`` carries over: XArch's eager is
  the dense reference. ``model.set_attn_implementation("sdpa")`` switches to the banded O(N·w) kernel.
"""

from __future__ import annotations

import torch
from transformers import LongformerConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    Converter,
    StateDict,
    register_converter,
    rename,
    shared_config_kwargs,
    shared_hf_kwargs,
    unsupported,
)

HEADS = {
    "LongformerModel": "XArchModel",
    "LongformerForMaskedLM": "XArchForMaskedLM",
    "LongformerForSequenceClassification": "XArchForSequenceClassification",
    "LongformerForTokenClassification": "XArchForTokenClassification",
}

PREFIX = "longformer."
TABLE = [
    ("longformer.embeddings.word_embeddings.weight", "model.embeddings.word_embeddings.weight"),
    ("longformer.embeddings.position_embeddings.weight", "model.embeddings.position_embeddings.weight"),
    ("longformer.embeddings.token_type_embeddings.weight", "model.embeddings.token_type_embeddings.weight"),
    ("longformer.embeddings.LayerNorm.{p}", "model.embeddings.norm.{p}"),
    ("longformer.encoder.layer.{i}.attention.self.query.{p}", "model.layers.{i}.attention.q_proj.{p}"),
    ("longformer.encoder.layer.{i}.attention.self.key.{p}", "model.layers.{i}.attention.k_proj.{p}"),
    ("longformer.encoder.layer.{i}.attention.self.value.{p}", "model.layers.{i}.attention.v_proj.{p}"),
    ("longformer.encoder.layer.{i}.attention.self.query_global.{p}", "model.layers.{i}.attention.query_global.{p}"),
    ("longformer.encoder.layer.{i}.attention.self.key_global.{p}", "model.layers.{i}.attention.key_global.{p}"),
    ("longformer.encoder.layer.{i}.attention.self.value_global.{p}", "model.layers.{i}.attention.value_global.{p}"),
    ("longformer.encoder.layer.{i}.attention.output.dense.{p}", "model.layers.{i}.attention.o_proj.{p}"),
    ("longformer.encoder.layer.{i}.attention.output.LayerNorm.{p}", "model.layers.{i}.attention_norm.{p}"),
    ("longformer.encoder.layer.{i}.intermediate.dense.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("longformer.encoder.layer.{i}.output.dense.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("longformer.encoder.layer.{i}.output.LayerNorm.{p}", "model.layers.{i}.mlp_norm.{p}"),
    ("longformer.pooler.dense.{p}", "pooler.dense.{p}"),
    ("lm_head.dense.{p}", "lm_head.dense.{p}"),
    ("lm_head.layer_norm.{p}", "lm_head.norm.{p}"),
    ("lm_head.decoder.{p}", "lm_head.decoder.{p}"),
    # LongformerClassificationHead: dense -> tanh -> out_proj on the first token = XArch's pooler -> classifier
    ("classifier.dense.{p}", "pooler.dense.{p}"),
    ("classifier.out_proj.{p}", "classifier.{p}"),
    ("classifier.{p}", "classifier.{p}"),
]
POSITIONS = "longformer.embeddings.position_embeddings.weight"
SHARED_BIAS = "lm_head.bias"  # tied to lm_head.decoder.bias


def position_offset(hf_config: PreTrainedConfig) -> int:
    """RoBERTa's first real position is ``padding_idx + 1``."""
    return (hf_config.pad_token_id if hf_config.pad_token_id is not None else 1) + 1


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = []
    if not isinstance(hf_config.hidden_act, str):
        problems.append(f"hidden_act={hf_config.hidden_act!r}: only activation names (ACT2FN keys) can be saved")
    if hf_class_name == "LongformerForMaskedLM" and hf_config.hidden_act != "gelu":
        problems.append(f"hidden_act={hf_config.hidden_act!r}: Longformer's LM head always uses gelu, XArch's MLM head "
                        "uses hidden_act, so they agree only for 'gelu'")
    unsupported("Longformer", problems)
    offset = position_offset(hf_config)
    return XArchConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        hidden_act=hf_config.hidden_act,
        max_position_embeddings=hf_config.max_position_embeddings - offset,
        type_vocab_size=hf_config.type_vocab_size,
        is_decoder=False,
        attention_type="sliding_window",
        attention_window=list(hf_config.attention_window)
        if isinstance(hf_config.attention_window, (list, tuple))
        else hf_config.attention_window,
        global_projections=True,
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
        classifier_dropout=getattr(hf_config, "classifier_dropout", None),
        classifier_pooling="first",
        initializer_range=hf_config.initializer_range,
        **shared_config_kwargs(hf_config),
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    state_dict = dict(state_dict)
    shared_bias = state_dict.pop(SHARED_BIAS, None)
    if shared_bias is not None:
        state_dict.setdefault("lm_head.decoder.bias", shared_bias)
    if POSITIONS in state_dict:
        state_dict[POSITIONS] = state_dict[POSITIONS][position_offset(hf_config) :]
    return rename(state_dict, TABLE)


def config_to_hf(config: XArchConfig, hf_class_name: str) -> LongformerConfig:
    problems = []
    required = dict(
        is_decoder=False,
        global_projections=True,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="post",
        final_norm=False,
        embedding_norm=True,
        mlp_type="plain",
        attention_bias=True,
        qkv_bias=True,
        mlp_bias=True,
        position_offset=0,  # the table is shifted instead (see the module docstring)
        num_key_value_heads=config.num_attention_heads,
        embedding_size=config.hidden_size,
        attention_sink_size=0,
    )
    for name, wanted in required.items():
        if getattr(config, name) != wanted:
            problems.append(f"XArchConfig.{name}={getattr(config, name)!r}, but Longformer needs {wanted!r}")
    if set(config.layer_types) != {"sliding_attention"}:
        problems.append(f"XArchConfig.layer_types={config.layer_types}: Longformer has sliding-window layers only")
    if config.attention_dilation not in (None, 1) and set(_flat(config.attention_dilation)) != {1}:
        problems.append(f"XArchConfig.attention_dilation={config.attention_dilation!r}: transformers' Longformer has "
                        "no dilation")
    if config.type_vocab_size == 0:
        problems.append("XArchConfig.type_vocab_size=0: Longformer always adds a token-type embedding")
    pad = config.pad_token_id if config.pad_token_id is not None else 1
    unsupported("XArch", problems)
    return LongformerConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings + pad + 1,
        type_vocab_size=config.type_vocab_size,
        attention_window=config.attention_window,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.norm_eps,
        **shared_hf_kwargs(config),
    )


def _flat(dilation):
    for entry in dilation if isinstance(dilation, list) else [dilation]:
        yield from (entry if isinstance(entry, list) else [entry])


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    table = TABLE
    if hf_class_name == "LongformerForSequenceClassification":
        table = [pair for pair in TABLE if pair[0] not in ("longformer.pooler.dense.{p}", "classifier.{p}")]
    elif hf_class_name in ("LongformerModel", "LongformerForMaskedLM", "LongformerForTokenClassification"):
        table = [pair for pair in TABLE if not pair[0].startswith("classifier.") or pair[0] == "classifier.{p}"]
    out = rename(state_dict, table, reverse=True)
    pad = config.pad_token_id if config.pad_token_id is not None else 1
    positions = out[POSITIONS]
    out[POSITIONS] = torch.cat([positions.new_zeros(pad + 1, positions.shape[1]), positions])
    if "lm_head.decoder.bias" in out:
        out[SHARED_BIAS] = out["lm_head.decoder.bias"]
    return out


LONGFORMER = register_converter(
    Converter(
        model_type="longformer",
        heads=HEADS,
        config_from_hf=config_from_hf,
        state_dict_from_hf=state_dict_from_hf,
        config_to_hf=config_to_hf,
        state_dict_to_hf=state_dict_to_hf,
        droppable_prefixes=("pooler.",),  # LongformerModel's pooler: XArchModel returns hidden states only
        hf_init_kwargs={"LongformerModel": {"add_pooling_layer": False}},
    )
)
