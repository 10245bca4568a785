"""LED, the Longformer Encoder-Decoder (Beltagy et al. 2020) <-> XArch.

LED is BART (see ``bart.py``) whose encoder's self-attention is Longformer's (``longformer.py``): sliding windows of
``attention_window`` (one per layer, w/2 keys on each side) and separate projections for the rows of global tokens;
its positions have no offset, and the encoder and decoder position tables have their own lengths. In XArch terms:
BART's config with ``attention_type="sliding_window"``, ``attention_window``, ``global_projections=True``,
``position_offset=0``, ``max_position_embeddings=max_encoder_position_embeddings`` and
``max_decoder_position_embeddings``; BART's weights with Longformer's attention in the encoder.

- Global tokens: LED takes ``global_attention_mask`` and so does ``XArchForConditionalGeneration`` (and its
  ``generate()``); neither invents one. XArch needs none to work on any length (``tests/test_seq2seq.py``).
- Lengths: LED pads every input to a multiple of the window inside the model; XArch takes any length, with the same
  outputs at real tokens.
- Attention implementation: transformers' LED runs eager only, so ``from_hf`` builds XArch's default (``sdpa``: the
  banded O(N·w) kernel, our CPU kernel where it applies) rather than XArch's eager, which is the dense reference; and
  ``to_hf`` builds LED's eager whatever the XArch model runs.
"""

from __future__ import annotations

from transformers import LEDConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .bart import (
    FIELDS as BART_FIELDS,
)
from .bart import (
    bart_config,
    bart_hf_config,
    shared_weights_from_hf,
    shared_weights_to_hf,
    weight_table,
)
from .base import Converter, StateDict, check_xarch_config, heads, register_converter
from .fields import ConfigTable, window_problems

FIELDS = ConfigTable(
    LEDConfig,
    renamed=(
        *BART_FIELDS.renamed,
        ("max_encoder_position_embeddings", "max_position_embeddings"),
        ("max_decoder_position_embeddings", "max_decoder_position_embeddings"),
        ("attention_window", "attention_window"),
    ),
    fixed={**BART_FIELDS.fixed, "position_offset": 0, "attention_type": "sliding_window", "global_projections": True},
)
# Longformer's self-attention of LED's encoder layers
ENCODER_ATTENTION = {
    "self_attn.longformer_self_attn.query": "attention.q_proj",
    "self_attn.longformer_self_attn.key": "attention.k_proj",
    "self_attn.longformer_self_attn.value": "attention.v_proj",
    "self_attn.longformer_self_attn.query_global": "attention.query_global",
    "self_attn.longformer_self_attn.key_global": "attention.key_global",
    "self_attn.longformer_self_attn.value_global": "attention.value_global",
    "self_attn.output": "attention.o_proj",
}
PREFIX = "led."
TABLE = weight_table(PREFIX, ENCODER_ATTENTION)


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    return bart_config(hf_config, FIELDS, "LED")


def config_to_hf(config: XArchConfig, hf_class_name: str) -> PreTrainedConfig:
    # attention_type is checked through layer_types (every layer sliding), which a mixed stack also sets
    required = {name: value for name, value in FIELDS.fixed.items() if name != "attention_type"}
    problems = check_xarch_config(config, "LED", required, layer_type="sliding_attention") + window_problems(config, "LED")
    attention_window = config.attention_window
    return bart_hf_config(
        config,
        FIELDS,
        "LED",
        problems,
        decoder_layers=config.num_decoder_layers or config.num_hidden_layers,
        max_decoder_position_embeddings=config.max_decoder_position_embeddings or config.max_position_embeddings,
        attention_window=attention_window if isinstance(attention_window, list) else
        [attention_window] * config.num_hidden_layers,
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    return shared_weights_from_hf(state_dict, TABLE, PREFIX, "LED")


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    return shared_weights_to_hf(state_dict, TABLE, PREFIX, hf_class_name.endswith("ForConditionalGeneration"))


LED = register_converter(
    Converter(
        "led",
        heads("LED", "Model", "ForConditionalGeneration"),
        config_from_hf,
        state_dict_from_hf,
        config_to_hf,
        state_dict_to_hf,
    )
)
