"""T5 (Raffel et al. 2020) <-> XArch, in both flavours: the original (relu MLP, decoder output scaled by
``d_model ** -0.5`` before the head) and v1.1 (gated-gelu MLP, ``feed_forward_proj="gated-gelu"``, no scaling).

T5 is a pre-norm encoder-decoder with RMS norms (``T5LayerNorm``) and a final norm on each stack, no biases, no
absolute positions and the bucketed relative position bias, one table per stack shared by its layers (held by its
first layer). In XArch terms: ``is_encoder_decoder``, ``norm_type="rmsnorm"``, ``norm_position="pre"``,
``position_embedding_type="t5_relative"``, ``attention_bias=qkv_bias=mlp_bias=False``, ``head_dim=d_kv`` and an
embedding table without a padding row (``train_pad_embedding=True``: T5's ``shared`` trains every row).

- Scores: T5 does not divide q·k by sqrt(d_kv) (its initialisation absorbs it); XArch does, so ``from_hf`` multiplies
  the query projections by sqrt(d_kv) and ``to_hf`` divides them back (equal up to rounding).
- The original flavour's ``d_model ** -0.5`` before the tied head is folded into the decoder's final norm weight, so
  logits are the same and the decoder's last hidden state is T5's times that factor. ``to_hf`` always writes the
  original flavour's scaling (transformers 5 derives ``scale_decoder_outputs`` from ``tie_word_embeddings`` again at
  every load and always ties the head) with the factor taken back out of that norm: the same function, and a v1.1
  model comes back as an original-flavour config with a rescaled decoder norm.
- Positions: T5 numbers 0..n-1 whatever the mask, XArch counts real tokens; with right padding (T5's tokenizer) both
  agree at every real token.
- ``decoder_start_token_id`` defaults to ``pad_token_id`` (T5's convention) when the T5 config has none.
"""

from __future__ import annotations

import torch
from transformers import T5Config
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    Converter,
    StateDict,
    check_no_layer_sharing,
    check_xarch_config,
    heads,
    register_converter,
    rename,
    unsupported,
)
from .fields import ConfigTable

FIELDS = ConfigTable(
    T5Config,
    renamed=(
        ("vocab_size", "vocab_size"),
        ("d_model", "hidden_size"),
        ("d_kv", "head_dim"),
        ("d_ff", "intermediate_size"),
        ("num_layers", "num_hidden_layers"),
        ("num_decoder_layers", "num_decoder_layers"),
        ("num_heads", "num_attention_heads"),
        ("relative_attention_num_buckets", "relative_attention_num_buckets"),
        ("relative_attention_max_distance", "relative_attention_max_distance"),
        ("layer_norm_epsilon", "norm_eps"),
        ("dropout_rate", "hidden_dropout"),
        ("dropout_rate", "attention_dropout"),
        ("dense_act_fn", "hidden_act"),
    ),
    fixed={
        "is_encoder_decoder": True,
        "is_decoder": False,
        "decoder_attention_type": "full",
        "position_embedding_type": "t5_relative",
        "type_vocab_size": 0,
        "norm_type": "rmsnorm",
        "norm_position": "pre",
        "final_norm": True,
        "embedding_norm": False,
        "attention_bias": False,
        "qkv_bias": False,
        "mlp_bias": False,
        "train_pad_embedding": True,
    },
)


def layer_rows(stack: str, names: dict[str, str]) -> list[tuple[str, str]]:
    return [(f"transformer.{stack}.block.{{i}}.layer.{hf}", f"model.{stack}.layers.{{i}}.{xarch}")
            for hf, xarch in names.items()]


def mlp_names(index: int, gated: bool) -> dict[str, str]:
    """T5's feed-forward sublayer ``index`` of a block: plain (``wi``) or gated (``wi_0`` gate, ``wi_1`` up)."""
    inputs = {"wi_0": "gate_proj", "wi_1": "up_proj"} if gated else {"wi": "up_proj"}
    names = {f"{index}.DenseReluDense.{hf}.weight": f"mlp.{xarch}.weight" for hf, xarch in inputs.items()}
    return {**names, f"{index}.DenseReluDense.wo.weight": "mlp.down_proj.weight",
            f"{index}.layer_norm.weight": "mlp_norm.weight"}


def attention_names(index: int, module: str, xarch: str) -> dict[str, str]:
    names = {f"{index}.{module}.{p}.weight": f"{xarch}.{p}_proj.weight" for p in ("q", "k", "v", "o")}
    return {**names, f"{index}.layer_norm.weight": f"{xarch}_norm.weight"}


def weight_table(gated: bool) -> list[tuple[str, str]]:
    """(transformers key, XArch key), keys under T5's base-model prefix ``transformer.``; ``{i}`` is the layer."""
    return [*STACK_ROWS, *layer_rows("encoder", {**SELF_ATTENTION, **mlp_names(1, gated)}),
            *layer_rows("decoder", {**SELF_ATTENTION, **CROSS_ATTENTION, **mlp_names(2, gated)}),
            ("transformer.lm_head.weight", "lm_head.weight")]


SELF_ATTENTION = attention_names(0, "SelfAttention", "attention")
CROSS_ATTENTION = attention_names(1, "EncDecAttention", "cross_attention")
STACK_ROWS = [
    *[
        row
        for stack in ("encoder", "decoder")
        for row in (
            (f"transformer.{stack}.embed_tokens.weight", f"model.{stack}.embeddings.word_embeddings.weight"),
            (f"transformer.{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             f"model.{stack}.layer_positions.relative_attention_bias.weight"),
            (f"transformer.{stack}.final_layer_norm.weight", f"model.{stack}.norm.weight"),
        )
    ],
]
SHARED = "transformer.shared.weight"
DECODER_NORM = "model.decoder.norm.weight"


def scales_decoder_output(hf_config: PreTrainedConfig, hf_class_name: str) -> bool:
    return hf_class_name == "T5ForConditionalGeneration" and bool(getattr(hf_config, "scale_decoder_outputs", True))


def initializer_range(hf_config: PreTrainedConfig) -> float:
    """T5's std for most of its weights (k, v, wi, the relative table: ``initializer_factor * d_model ** -0.5``)."""
    return hf_config.initializer_factor * hf_config.d_model**-0.5


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    start = getattr(hf_config, "decoder_start_token_id", None)
    return FIELDS.to_xarch(
        hf_config,
        initializer_range=initializer_range(hf_config),
        mlp_type="gated" if hf_config.is_gated_act else "plain",
        decoder_start_token_id=hf_config.pad_token_id if start is None else start,
    )


def config_to_hf(config: XArchConfig, hf_class_name: str) -> PreTrainedConfig:
    # transformers 5's T5 always ties its head to the shared table
    required = {**FIELDS.fixed, "tie_word_embeddings": True}
    problems = check_xarch_config(config, "T5", required) + check_no_layer_sharing(config, "T5")
    # T5 takes any d_kv (num_heads * d_kv need not be d_model)
    problems = [problem for problem in problems if not problem.startswith("XArchConfig.head_dim=")]
    if config.hidden_dropout != config.attention_dropout:
        problems.append(f"XArchConfig.hidden_dropout={config.hidden_dropout} != attention_dropout="
                        f"{config.attention_dropout}, but T5 has one dropout_rate")
    decoder = config.stack_config("decoder") if config.is_encoder_decoder else None
    if decoder is not None and sorted(set(decoder.layer_types)) != ["full_attention"]:
        problems.append(f"XArchConfig.decoder_layer_types use {sorted(set(decoder.layer_types))}, but T5's decoder "
                        "has only full attention")
    unsupported("XArch", problems)
    hf_config = FIELDS.to_hf(
        config,
        num_decoder_layers=config.num_decoder_layers or config.num_hidden_layers,
        feed_forward_proj=("gated-" if config.mlp_type == "gated" else "") + config.hidden_act,
    )
    hf_config.decoder_start_token_id = config.decoder_start_token_id
    return hf_config


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    state_dict = dict(state_dict)
    shared = state_dict.pop(SHARED)
    if not torch.equal(shared, state_dict["transformer.encoder.embed_tokens.weight"]):
        unsupported("T5", [f"{SHARED} differs from the encoder's embed_tokens: XArch's stacks share one table"])
    head = state_dict.get("transformer.lm_head.weight")
    if head is not None and not torch.equal(head, shared):
        unsupported("T5", ["an lm_head that is not the shared table: the converted head would be tied to it"])
    converted = rename(state_dict, weight_table(hf_config.is_gated_act))
    scale = hf_config.d_kv**0.5  # T5 scores q·k unscaled; XArch divides by sqrt(head_dim)
    for key in [key for key in converted if key.endswith(("attention.q_proj.weight", "cross_attention.q_proj.weight"))]:
        converted[key] = converted[key] * scale
    if scales_decoder_output(hf_config, hf_class_name):
        converted[DECODER_NORM] = converted[DECODER_NORM] * hf_config.d_model**-0.5
    return converted


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    converted = rename(state_dict, weight_table(config.mlp_type == "gated"), reverse=True)
    converted[SHARED] = converted["transformer.encoder.embed_tokens.weight"]
    scale = config.head_dim**0.5
    for key in [key for key in converted if key.endswith(("SelfAttention.q.weight", "EncDecAttention.q.weight"))]:
        converted[key] = converted[key] / scale
    if hf_class_name == "T5ForConditionalGeneration":  # its config scales the decoder output (it survives a reload)
        converted["transformer.decoder.final_layer_norm.weight"] = (
            converted["transformer.decoder.final_layer_norm.weight"] * config.hidden_size**0.5
        )
    return converted


T5 = register_converter(
    Converter(
        "t5",
        heads("T5", "Model", "ForConditionalGeneration"),
        config_from_hf,
        state_dict_from_hf,
        config_to_hf,
        state_dict_to_hf,
    )
)
