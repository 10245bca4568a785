"""Mistral (Jiang et al. 2023) <-> XArch.

Mistral is Llama (see ``llama.py``) with a causal sliding window and no biases: every query sees itself and the
``sliding_window - 1`` tokens before it. In XArch terms: Llama's config plus ``attention_type="sliding_window"`` with
``attention_window = sliding_window`` (or ``"full"`` when Mistral's ``sliding_window`` is None), and
``attention_bias=False, mlp_bias=False``. The weights are Llama's table as they are.
"""

from __future__ import annotations

from transformers import MistralConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from . import llama
from .base import Converter, heads, register_converter
from .fields import LLAMA_FIELDS, PRE_NORM_DECODER, ConfigTable

HEADS = heads("Mistral", "Model", "ForCausalLM", "ForTokenClassification")

FIELDS = ConfigTable(
    MistralConfig,
    renamed=LLAMA_FIELDS,
    fixed={**PRE_NORM_DECODER, "attention_bias": False, "qkv_bias": False, "mlp_bias": False},
)


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    window = hf_config.sliding_window
    options = {"attention_type": "sliding_window", "attention_window": window} if window else {}
    return llama.llama_config(FIELDS, hf_config, hf_class_name, "Mistral", **options)


def config_to_hf(config: XArchConfig, hf_class_name: str) -> MistralConfig:
    window = config.sliding_window if set(config.layer_types) == {"sliding_attention"} else None
    return llama.llama_hf_config(FIELDS, config, hf_class_name, "Mistral", sliding=True, sliding_window=window)


MISTRAL = register_converter(
    Converter("mistral", HEADS, config_from_hf, llama.state_dict_from_hf, config_to_hf, llama.state_dict_to_hf)
)
