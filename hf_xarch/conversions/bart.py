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
    mismatches,
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


def layer_rows(stack: str, hf_names: dict[str, str]) -> list[tuple[str, str]]:
    return [(f"model.{stack}.layers.{{i}}.{hf}.{{p}}", f"model.{stack}.layers.{{i}}.{xarch}.{{p}}")
            for hf, xarch in hf_names.items()]


SELF_ATTENTION = {
    "self_attn.q_proj": "attention.q_proj",
    "self_attn.k_proj": "attention.k_proj",
    "self_attn.v_proj": "attention.v_proj",
    "self_attn.out_proj": "attention.o_proj",
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
# (transformers key, XArch key), head-model layout; `{i}` is the layer, `{p}` weight or bias
TABLE = [
    *[
        row
        for stack in ("encoder", "decoder")
        for row in (
            (f"model.{stack}.embed_tokens.weight", f"model.{stack}.embeddings.word_embeddings.weight"),
            (f"model.{stack}.embed_positions.weight", f"model.{stack}.embeddings.position_embeddings.weight"),
            (f"model.{stack}.layernorm_embedding.{{p}}", f"model.{stack}.embeddings.norm.{{p}}"),
        )
    ],
    *layer_rows("encoder", SELF_ATTENTION),
    *layer_rows("decoder", {**SELF_ATTENTION, **CROSS_ATTENTION}),
    ("lm_head.weight", "lm_head.weight"),
]
SHARED = "model.shared.weight"  # BART's own name of the token table the stacks and the head share
FINAL_LOGITS_BIAS = "final_logits_bias"


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = activation_problems("activation_function", hf_config.activation_function)
    if hf_config.scale_embedding:
        problems.append("scale_embedding=True: XArch does not scale the token embeddings by sqrt(d_model)")
    for decoder, encoder in DECODER_TWINS.items():
        if getattr(hf_config, decoder) != getattr(hf_config, encoder):
            problems.append(f"{decoder}={getattr(hf_config, decoder)} != {encoder}={getattr(hf_config, encoder)}: "
                            "XArch's encoder and decoder have the same widths and head counts")
    unsupported("BART", problems)
    training_only = {name: getattr(hf_config, name)
                     for name in ("activation_dropout", "encoder_layerdrop", "decoder_layerdrop")
                     if getattr(hf_config, name)}
    if training_only:
        logger.warning("BART's %s act only in training; XArch has neither, so the converted model is identical in "
                       "eval mode and fine-tunes without them", training_only)
    return FIELDS.to_xarch(hf_config, max_position_embeddings=hf_config.max_position_embeddings + POSITION_OFFSET)


def config_to_hf(config: XArchConfig, hf_class_name: str) -> PreTrainedConfig:
    required = {**FIELDS.fixed, "is_encoder_decoder": True}
    problems = check_xarch_config(config, "BART", required) + check_no_layer_sharing(config, "BART")
    decoder = config.stack_config("decoder") if config.is_encoder_decoder else None
    if decoder is not None and sorted(set(decoder.layer_types)) != ["full_attention"]:
        problems.append(f"XArchConfig.decoder_layer_types use {sorted(set(decoder.layer_types))}, but BART's decoder "
                        "has only full attention")
    unsupported("XArch", problems)
    layers = config.num_decoder_layers or config.num_hidden_layers
    return FIELDS.to_hf(
        config,
        decoder_layers=layers,
        decoder_attention_heads=config.num_attention_heads,
        decoder_ffn_dim=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings - POSITION_OFFSET,
        activation_dropout=0.0,
        scale_embedding=False,
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    state_dict = dict(state_dict)
    shared = state_dict.pop(SHARED)
    bias = state_dict.pop(FINAL_LOGITS_BIAS, None)
    if bias is not None and bool(bias.any()):
        unsupported("BART", [f"a non-zero {FINAL_LOGITS_BIAS}: XArch's LM head has no bias"])
    if not torch.equal(shared, state_dict["model.encoder.embed_tokens.weight"]):
        unsupported("BART", [f"{SHARED} differs from the encoder's embed_tokens: XArch's stacks share one table"])
    return rename(state_dict, TABLE)


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    converted = rename(state_dict, TABLE, reverse=True)
    converted[SHARED] = converted["model.encoder.embed_tokens.weight"]
    if hf_class_name == "BartForConditionalGeneration":
        table = converted[SHARED]
        converted[FINAL_LOGITS_BIAS] = torch.zeros(1, table.shape[0], dtype=table.dtype, device=table.device)
    return converted


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
