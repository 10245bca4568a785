"""BART (Lewis et al. 2020) <-> XArch.

BART is a post-norm encoder-decoder (``LayerNorm(x + f(x))`` around self-attention, cross-attention and the MLP), with
learned positions offset by 2 in both stacks, a LayerNorm on the embeddings of each stack, biases everywhere, no final
norm, and one token table shared by the encoder, the decoder and the LM head. In XArch terms: ``is_encoder_decoder``,
BERT's post-norm shape (``fields.POST_NORM_ENCODER``), ``position_offset=2`` over a table of
``max_position_embeddings + 2`` rows (kept whole: the round trip gives back every row), no token types.

- Positions: BART numbers 0..n-1 whatever the mask, XArch counts real tokens; with right padding (BART's tokenizer)
  both agree at every real token, so logits and generations are the same.
- Dropout: ``activation_dropout`` (after the MLP's activation) and LayerDrop (``encoder_layerdrop``,
  ``decoder_layerdrop``) exist only in training; XArch has neither, so they convert with a warning, identical in eval.
- Not convertible: ``scale_embedding=True`` (the scale would have to sit between the tied table and the head), a
  non-zero ``final_logits_bias``, and different encoder and decoder widths or head counts.
"""

from __future__ import annotations

import logging

import torch
from transformers import BartConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    Converter,
    StateDict,
    activation_problems,
    check_no_layer_sharing,
    check_xarch_config,
    heads,
    register_converter,
    rename,
    unsupported,
)
from .fields import POST_NORM_ENCODER, ConfigTable

logger = logging.getLogger(__name__)

POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding's offset: its table has max_position_embeddings + 2 rows

FIELDS = ConfigTable(
    BartConfig,
    renamed=(
        ("vocab_size", "vocab_size"),
        ("d_model", "hidden_size"),
        ("encoder_layers", "num_hidden_layers"),
        ("decoder_layers", "num_decoder_layers"),
        ("encoder_attention_heads", "num_attention_heads"),
        ("encoder_ffn_dim", "intermediate_size"),
        ("activation_function", "hidden_act"),
        ("dropout", "hidden_dropout"),
        ("attention_dropout", "attention_dropout"),
        ("init_std", "initializer_range"),
        ("decoder_start_token_id", "decoder_start_token_id"),
    ),
    fixed={**POST_NORM_ENCODER, "is_encoder_decoder": True, "type_vocab_size": 0, "norm_eps": 1e-5,
           "position_offset": POSITION_OFFSET, "decoder_attention_type": "full"},
)
# what the decoder repeats of the encoder's sizes (XArch's stacks share them)
DECODER_TWINS = {"decoder_attention_heads": "encoder_attention_heads", "decoder_ffn_dim": "encoder_ffn_dim"}


def layer_rows(stack: str, hf_names: dict[str, str], prefix: str = "model.") -> list[tuple[str, str]]:
    return [(f"{prefix}{stack}.layers.{{i}}.{hf}.{{p}}", f"model.{stack}.layers.{{i}}.{xarch}.{{p}}")
            for hf, xarch in hf_names.items()]


SELF_ATTENTION = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.o_proj",
}
FEED_FORWARD = {
    "self_attn_layer_norm": "attention_norm",
    "fc1": "mlp.up_proj",
    "fc2": "mlp.down_proj",
    "final_layer_norm": "mlp_norm",
}
CROSS_ATTENTION = {
    "encoder_attn.q_proj": "cross_attention.q_proj",
    "encoder_attn.k_proj": "cross_attention.k_proj",
    "encoder_attn.v_proj": "cross_attention.v_proj",
    "encoder_attn.out_proj": "cross_attention.o_proj",
    "encoder_attn_layer_norm": "cross_attention_norm",
}


def weight_table(prefix: str, encoder_attention: dict[str, str]) -> list[tuple[str, str]]:
    """(transformers key, XArch key) of a BART-shaped model under ``prefix`` (``model.``, LED's ``led.``) whose
    encoder's self-attention has the names ``encoder_attention``; ``{i}`` is the layer, ``{p}`` weight or bias."""
    return [
        *[
            row
            for stack in ("encoder", "decoder")
            for row in (
                (f"{prefix}{stack}.embed_tokens.weight", f"model.{stack}.embeddings.word_embeddings.weight"),
                (f"{prefix}{stack}.embed_positions.weight", f"model.{stack}.embeddings.position_embeddings.weight"),
                (f"{prefix}{stack}.layernorm_embedding.{{p}}", f"model.{stack}.embeddings.norm.{{p}}"),
            )
        ],
        *layer_rows("encoder", {**encoder_attention, **FEED_FORWARD}, prefix),
        *layer_rows("decoder", {**SELF_ATTENTION, **FEED_FORWARD, **CROSS_ATTENTION}, prefix),
        ("lm_head.weight", "lm_head.weight"),
    ]


TABLE = weight_table("model.", SELF_ATTENTION)
FINAL_LOGITS_BIAS = "final_logits_bias"


def bart_config(hf_config: PreTrainedConfig, fields: ConfigTable, family: str, **derived) -> XArchConfig:
    """The XArch config of a BART-shaped ``hf_config`` (BART, LED) through ``fields``; refuses what has no exact
    counterpart and warns about what acts only in training."""
    problems = activation_problems("activation_function", hf_config.activation_function)
    if getattr(hf_config, "scale_embedding", False):
        problems.append("scale_embedding=True: XArch does not scale the token embeddings by sqrt(d_model)")
    for decoder, encoder in DECODER_TWINS.items():
        if getattr(hf_config, decoder) != getattr(hf_config, encoder):
            problems.append(f"{decoder}={getattr(hf_config, decoder)} != {encoder}={getattr(hf_config, encoder)}: "
                            "XArch's encoder and decoder have the same widths and head counts")
    unsupported(family, problems)
    training_only = {name: getattr(hf_config, name)
                     for name in ("activation_dropout", "encoder_layerdrop", "decoder_layerdrop")
                     if getattr(hf_config, name)}
    if training_only:
        logger.warning("%s's %s act only in training; XArch has neither, so the converted model is identical in "
                       "eval mode and fine-tunes without them", family, training_only)
    return fields.to_xarch(hf_config, **derived)


def bart_hf_config(config: XArchConfig, fields: ConfigTable, family: str, problems: list[str], **derived):
    """``bart_config`` the other way: every XArch option ``family`` lacks (and ``problems`` found by the caller)
    raises, else its config from ``fields`` and ``derived``."""
    problems = problems + check_no_layer_sharing(config, family)
    decoder = config.stack_config("decoder") if config.is_encoder_decoder else None
    if decoder is not None and sorted(set(decoder.layer_types)) != ["full_attention"]:
        problems.append(f"XArchConfig.decoder_layer_types use {sorted(set(decoder.layer_types))}, but {family}'s "
                        "decoder has only full attention")
    unsupported("XArch", problems)
    return fields.to_hf(
        config,
        decoder_attention_heads=config.num_attention_heads,
        decoder_ffn_dim=config.intermediate_size,
        activation_dropout=0.0,
        **derived,
    )


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    return bart_config(hf_config, FIELDS, "BART",
                       max_position_embeddings=hf_config.max_position_embeddings + POSITION_OFFSET)


def config_to_hf(config: XArchConfig, hf_class_name: str) -> PreTrainedConfig:
    problems = check_xarch_config(config, "BART", {**FIELDS.fixed, "max_decoder_position_embeddings": None})
    return bart_hf_config(config, FIELDS, "BART", problems, decoder_layers=config.num_decoder_layers or
                          config.num_hidden_layers, max_position_embeddings=config.max_position_embeddings -
                          POSITION_OFFSET, scale_embedding=False)


def shared_weights_from_hf(state_dict: StateDict, table: list, prefix: str, family: str) -> StateDict:
    """A BART-shaped state dict renamed by ``table``: ``{prefix}shared`` (the stacks' one table) and a zero
    ``final_logits_bias`` have no XArch weight of their own."""
    state_dict = dict(state_dict)
    shared = state_dict.pop(f"{prefix}shared.weight")
    bias = state_dict.pop(FINAL_LOGITS_BIAS, None)
    if bias is not None and bool(bias.any()):
        unsupported(family, [f"a non-zero {FINAL_LOGITS_BIAS}: XArch's LM head has no bias"])
    if not torch.equal(shared, state_dict[f"{prefix}encoder.embed_tokens.weight"]):
        message = f"{prefix}shared.weight differs from the encoder's embed_tokens: XArch's stacks share one table"
        unsupported(family, [message])
    return rename(state_dict, table)


def shared_weights_to_hf(state_dict: StateDict, table: list, prefix: str, with_head: bool) -> StateDict:
    """``shared_weights_from_hf`` the other way (``with_head``: the LM head model, which has the logits bias)."""
    converted = rename(state_dict, table, reverse=True)
    shared = converted[f"{prefix}shared.weight"] = converted[f"{prefix}encoder.embed_tokens.weight"]
    if with_head:
        converted[FINAL_LOGITS_BIAS] = torch.zeros(1, shared.shape[0], dtype=shared.dtype, device=shared.device)
    return converted


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    return shared_weights_from_hf(state_dict, TABLE, "model.", "BART")


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    return shared_weights_to_hf(state_dict, TABLE, "model.", hf_class_name.endswith("ForConditionalGeneration"))


BART = register_converter(
    Converter(
        "bart",
        heads("Bart", "Model", "ForConditionalGeneration"),
        config_from_hf,
        state_dict_from_hf,
        config_to_hf,
        state_dict_to_hf,
    )
)
