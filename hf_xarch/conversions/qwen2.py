"""Qwen2 (Yang et al. 2024) <-> XArch.

Qwen2 is Llama (see ``llama.py``) with biases on the query/key/value projections and none on the output projection or
the MLP: ``qkv_bias=True, attention_bias=False, mlp_bias=False``. The weights are Llama's table as they are; the
config differs from Llama's only in those biases and in Qwen2's sliding-window options.

- Sliding windows: Qwen2 with ``use_sliding_window=True`` (some layers ``"sliding_attention"``) does not convert yet;
  released Qwen2 / Qwen2.5 checkpoints have it off.
- Positions: as Llama's (``generate`` passes mask-aware ``position_ids``; without them XArch skips left padding).
"""

from __future__ import annotations

from transformers import Qwen2Config
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from . import llama
from .base import Converter, heads, register_converter
from .fields import LLAMA_FIELDS, PRE_NORM_DECODER, ConfigTable

HEADS = heads("Qwen2", "Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification")

FIELDS = ConfigTable(
    Qwen2Config,
    renamed=LLAMA_FIELDS,
    fixed={**PRE_NORM_DECODER, "attention_bias": False, "qkv_bias": True, "mlp_bias": False},
)


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = []
    if set(hf_config.layer_types) != {"full_attention"}:
        problems.append(f"layer_types={hf_config.layer_types} (use_sliding_window={hf_config.use_sliding_window}): "
                        "only Qwen2 with full attention in every layer converts")
    return llama.llama_config(FIELDS, hf_config, hf_class_name, "Qwen2", problems)


def config_to_hf(config: XArchConfig, hf_class_name: str) -> Qwen2Config:
    return llama.llama_hf_config(FIELDS, config, hf_class_name, "Qwen2", use_sliding_window=False)


QWEN2 = register_converter(
    Converter("qwen2", HEADS, config_from_hf, llama.state_dict_from_hf, config_to_hf, llama.state_dict_to_hf)
)
