"""BigBird (Zaheer et al. 2020) <-> XArch.

BigBird is BERT (see ``bert.py``) with block-sparse attention: ``attention_type="block_sparse"`` is XArch's
``attention_type="bigbird"`` with the same ``block_size`` and ``num_random_blocks``, ``"original_full"`` is
``attention_type="full"``. The weights are BERT's table (BigBird's base model is also under ``bert.``), with its
pooler a plain Linear (``bert.pooler``) and its q/k/v biases following ``use_bias`` (XArch's ``qkv_bias``).

- Random plan: transformers' BigBird draws its random blocks only in training; in eval mode every random block of a
  middle query block is the first block (counted once more per random block). A converted model gets
  ``bigbird_random_plan="transformers"``, which reproduces that in eval mode: outputs are identical there. In
  training XArch draws its own seeded plan (it does not replay transformers' numpy draws).
- Lengths: transformers switches a block-sparse model to full attention for good once an input has at most
  ``(5 + 2 * num_random_blocks) * block_size`` tokens (a warning, and the model stays switched); XArch never
  switches, so the two agree at longer inputs, where transformers' block-sparse path runs. Both take any length
  (transformers pads to a multiple of ``block_size`` inside the model).
- Padded batches: transformers lays blocks over the padded batch, so a shorter row's last global block is the
  batch's last block (padding for it) and its outputs depend on how far it was padded; XArch counts blocks on each
  row's real tokens. Rows that fill the batch agree exactly, and a padded row's XArch outputs are transformers'
  outputs for that row alone.
- Embeddings: BigBird drops out before its embedding LayerNorm, XArch after it: identical in eval mode.
- Pooler: ``BigBirdForMaskedLM`` holds one its logits never read; ``from_hf`` drops it (warned) and ``to_hf`` fills it
  with zeros.
- ``rescale_embeddings=True``, decoders, and the sequence-classification (its head applies ``hidden_act``, XArch's
  pooler tanh) and question-answering heads do not convert.
"""

from __future__ import annotations

import torch
from transformers import BigBirdConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from . import bert
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
from .fields import BERT_FIELDS, POST_NORM_ENCODER, ConfigTable, fold_shared_bias, unfold_shared_bias

HEADS = heads("BigBird", "Model", "ForMaskedLM", "ForTokenClassification")
# BERT's shape, with BigBird's own switch for the q/k/v biases
FIELDS = ConfigTable(
    BigBirdConfig,
    renamed=(*BERT_FIELDS, ("use_bias", "qkv_bias"), ("classifier_dropout", "classifier_dropout")),
    fixed={name: value for name, value in POST_NORM_ENCODER.items() if name != "qkv_bias"},
)
# BERT's weights; BigBird's pooler is a Linear of its own
TABLE = [pair for pair in bert.TABLE if not pair[0].startswith("bert.pooler.")] + [("bert.pooler.{p}", "pooler.dense.{p}")]
# BigBird's attention_type -> XArch's; the block options go with block_sparse only
ATTENTION = {"block_sparse": ("bigbird", "bigbird_attention"), "original_full": ("full", "full_attention")}


def attention_options(hf_config: PreTrainedConfig) -> dict:
    if hf_config.attention_type != "block_sparse":
        return {"attention_type": "full"}
    return {"attention_type": "bigbird", "block_size": hf_config.block_size,
            "num_random_blocks": hf_config.num_random_blocks, "bigbird_random_plan": "transformers"}


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = bert.encoder_problems(hf_config, hf_class_name, "BigBird", "BigBirdForCausalLM")
    if hf_config.attention_type not in ATTENTION:
        problems.append(f"attention_type={hf_config.attention_type!r}: one of {sorted(ATTENTION)} converts")
    if hf_config.rescale_embeddings:
        problems.append("rescale_embeddings=True: XArch does not scale token embeddings by sqrt(hidden_size)")
    unsupported("BigBird", problems)
    return FIELDS.to_xarch(hf_config, classifier_pooling="first", **attention_options(hf_config))


def config_to_hf(config: XArchConfig, hf_class_name: str) -> BigBirdConfig:
    kinds = set(config.layer_types)
    found = [name for name, (_, layer_type) in ATTENTION.items() if kinds == {layer_type}]
    required = bert.required_fields(FIELDS, hf_class_name, qkv_bias=config.qkv_bias)
    layer_type = ATTENTION[found[0]][1] if found else "bigbird_attention"
    problems = check_xarch_config(config, "BigBird", required, layer_type) + check_no_layer_sharing(config, "BigBird")
    if found == ["block_sparse"] and config.bigbird_random_plan != "transformers":
        problems.append(f"XArchConfig.bigbird_random_plan={config.bigbird_random_plan!r}, but BigBird's eval-mode "
                        "plan is 'transformers' (its random blocks are the first block outside training)")
    unsupported("XArch", problems)
    if found == ["block_sparse"]:
        return FIELDS.to_hf(config, attention_type="block_sparse", block_size=config.block_size,
                            num_random_blocks=config.num_random_blocks, use_bias=config.qkv_bias)
    return FIELDS.to_hf(config, attention_type="original_full", use_bias=config.qkv_bias)


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    return rename(fold_shared_bias(state_dict, *bert.SHARED_BIAS), TABLE)


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    out = unfold_shared_bias(rename(state_dict, TABLE, reverse=True), *bert.SHARED_BIAS)
    if hf_class_name == "BigBirdForMaskedLM" and "bert.pooler.weight" not in out:
        # BigBirdForMaskedLM always builds a pooler that its logits never read (from_hf drops it): zeros fill it
        width = config.hidden_size
        out |= {"bert.pooler.weight": torch.zeros(width, width), "bert.pooler.bias": torch.zeros(width)}
    return out


BIG_BIRD = register_converter(Converter(
    "big_bird", HEADS, config_from_hf, state_dict_from_hf, config_to_hf, state_dict_to_hf,
    **bert.without_pooler("BigBirdModel"),
))
