"""What a converter is, the registry of them, and the helpers every family shares.

A converter translates one transformers model family (keyed by ``config.model_type``) to XArch and back:

- ``config_from_hf(hf_config, hf_class_name) -> XArchConfig`` raises ``ValueError`` for every option the family has
  that XArch cannot reproduce exactly;
- ``state_dict_from_hf(hf_state_dict, hf_config, hf_class_name) -> dict`` renames (and reshapes) the weights. It
  always sees the keys of a *head* model (``bert.embeddings...``, ``transformer.h.0...``) and returns the keys of an
  XArch head model (``model.embeddings...``, ``lm_head...``); ``hf_xarch.convert`` adds and strips the base-model
  prefixes, so a family never special-cases ``BertModel`` against ``BertForMaskedLM``;
- ``config_to_hf(xarch_config, hf_class_name)`` / ``state_dict_to_hf(state_dict, xarch_config, hf_class_name)``: the
  way back, for ``to_hf``; ``config_to_hf`` raises ``ValueError`` listing every XArch option the family lacks;
- ``heads``: which transformers class becomes which XArch class.

The family files only import torch, transformers and this module; they never build models (``convert.py`` does).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Converter:
    """How one transformers family (``model_type``) maps onto XArch. See the module docstring for each callable."""

    model_type: str
    # transformers class name -> XArch class name, e.g. {"BertForMaskedLM": "XArchForMaskedLM"}
    heads: dict[str, str]
    config_from_hf: Callable[[PreTrainedConfig, str], XArchConfig]
    state_dict_from_hf: Callable[[StateDict, PreTrainedConfig, str], StateDict]
    config_to_hf: Callable[[XArchConfig, str], PreTrainedConfig]
    state_dict_to_hf: Callable[[StateDict, XArchConfig, str], StateDict]
    # XArch-side key prefixes that some transformers heads carry but their XArch counterpart has no place for (BERT's
    # pooler in a bare BertModel): dropped with a warning instead of failing the conversion
    droppable_prefixes: tuple[str, ...] = ()
    # extra constructor arguments of a transformers class in `to_hf` (BertModel without its pooler, ...)
    hf_init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


CONVERTERS: dict[str, Converter] = {}

# the XArch class of each transformers head class, by the suffix after the family's prefix ("Bert" + "ForMaskedLM")
XARCH_HEADS = {
    "Model": "XArchModel",
    "ForCausalLM": "XArchForCausalLM",
    "LMHeadModel": "XArchForCausalLM",
    "ForMaskedLM": "XArchForMaskedLM",
    "ForSequenceClassification": "XArchForSequenceClassification",
    "ForTokenClassification": "XArchForTokenClassification",
    "ForQuestionAnswering": "XArchForQuestionAnswering",
    "ForConditionalGeneration": "XArchForConditionalGeneration",
}
# the heads of a BERT-like encoder
ENCODER_HEADS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def heads(prefix: str, *suffixes: str) -> dict[str, str]:
    """``Converter.heads`` of a family whose classes are ``prefix + suffix``: ``heads("Bert", "Model")`` is
    ``{"BertModel": "XArchModel"}``."""
    return {prefix + suffix: XARCH_HEADS[suffix] for suffix in suffixes}


def register_converter(converter: Converter) -> Converter:
    """Make ``converter`` the one ``from_hf`` / ``to_hf`` use for ``converter.model_type``."""
    CONVERTERS[converter.model_type] = converter
    return converter


def unsupported(family: str, problems: list[str]) -> None:
    """Raise one ValueError listing everything that stops an exact conversion (better than fixing them one by one)."""
    if problems:
        listing = "\n  - ".join(problems)
        raise ValueError(f"cannot convert this {family} model exactly:\n  - {listing}")


# the fields every transformers config has whose meaning XArch keeps, under the same names (labels, special tokens,
# tying), with the value of those some families' configs lack
SHARED_FIELDS = {
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
    "tie_word_embeddings": True,
    "problem_type": None,
    "use_cache": True,
}


def shared_config_kwargs(hf_config: PreTrainedConfig) -> dict[str, Any]:
    """``SHARED_FIELDS`` of a transformers config, and its labels if it has any."""
    kwargs = {name: getattr(hf_config, name, default) for name, default in SHARED_FIELDS.items()}
    if hf_config.id2label is not None:
        kwargs |= {"id2label": dict(hf_config.id2label), "label2id": dict(hf_config.label2id)}
    return kwargs


def shared_hf_kwargs(config: XArchConfig) -> dict[str, Any]:
    """``shared_config_kwargs`` the other way."""
    kwargs = {name: getattr(config, name) for name in SHARED_FIELDS}
    return kwargs | {"id2label": dict(config.id2label), "label2id": dict(config.label2id)}


def mismatches(config: XArchConfig, family: str, required: dict[str, Any]) -> list[str]:
    """One line per field of ``required`` whose value in ``config`` is not the one ``family`` needs."""
    return [
        f"XArchConfig.{name}={getattr(config, name)!r}, but {family} needs {wanted!r}"
        for name, wanted in required.items()
        if getattr(config, name) != wanted
    ]


def check_xarch_config(
    config: XArchConfig,
    family: str,
    required: dict[str, Any],
    layer_type: str = "full_attention",
    factorized_embeddings: bool = False,
) -> list[str]:
    """Compare ``config`` with what a multi-head ``family`` model (one ``layer_type`` in every layer, embeddings
    factorized or not) can express; return one line per mismatch."""
    # options most families lack, unless `required` names them
    plain = {"qkv_bias": config.attention_bias, "position_offset": 0}
    problems = mismatches(config, family, required | {name: value for name, value in plain.items() if name not in required})
    families = sorted(set(config.layer_types))
    if families != [layer_type]:
        problems.append(
            f"XArchConfig.layer_types use {families}, but {family} has only {layer_type.replace('_', ' ')}"
        )
    if config.num_key_value_heads != config.num_attention_heads:
        problems.append(
            f"XArchConfig.num_key_value_heads={config.num_key_value_heads} (grouped-query attention), but {family} "
            f"has one key/value head per query head ({config.num_attention_heads})"
        )
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(
            f"XArchConfig.head_dim={config.head_dim} x num_attention_heads={config.num_attention_heads} != "
            f"hidden_size={config.hidden_size}, but {family} splits hidden_size evenly into heads"
        )
    if getattr(config, "output_layer", "full") != "full":
        problems.append(f"XArchConfig.output_layer={config.output_layer!r}, but {family} has a plain linear output")
    if factorized_embeddings and config.embedding_size == config.hidden_size:
        problems.append(
            f"XArchConfig.embedding_size == hidden_size == {config.hidden_size}: {family} always factorizes its "
            "embeddings (embedding_size < hidden_size)"
        )
    if not factorized_embeddings and config.embedding_size != config.hidden_size:
        problems.append(
            f"XArchConfig.embedding_size={config.embedding_size} (factorized embeddings), but {family} embeds "
            f"straight into hidden_size={config.hidden_size}"
        )
    return problems


def activation_problems(field: str, value: Any) -> list[str]:
    """One line if the activation ``field`` holds a function object: only names (ACT2FN keys) go into a config."""
    if isinstance(value, str):
        return []
    return [f"{field}={value!r}: only activation names (ACT2FN keys) can be saved"]


def qa_problems(hf_config: PreTrainedConfig, hf_class_name: str) -> list[str]:
    """One line if a question-answering head has other than XArch's two outputs (span start and end)."""
    if hf_class_name.endswith("ForQuestionAnswering") and hf_config.num_labels != 2:
        return [f"{hf_class_name} with num_labels={hf_config.num_labels}: XArch's QA head has 2"]
    return []


def check_no_layer_sharing(config: XArchConfig, family: str) -> list[str]:
    """One line if ``config`` shares blocks across layers (ALBERT's ``num_hidden_groups``), which ``family`` lacks."""
    groups, inner = getattr(config, "num_hidden_groups", None), getattr(config, "inner_group_num", None)
    if (groups is not None and groups * (inner or 1) != config.num_hidden_layers) or (inner or 1) != 1:
        return [(
            f"XArchConfig.num_hidden_groups={groups}, inner_group_num={inner} share blocks across layers, but "
            f"{family} has its own weights in every layer"
        )]
    return []


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
    return re.compile(pattern)


# `{i}` is a layer index, `{p}` a parameter of a Linear / LayerNorm / Embedding
_PLACEHOLDERS = {"i": r"\d+", "p": r"weight|bias"}


def rename(state_dict: StateDict, table: list[tuple[str, str]], reverse: bool = False) -> StateDict:
    """Rename every key by the first ``(transformers, xarch)`` template pair of ``table`` that matches it whole
    (``reverse=True`` renames XArch keys back). Templates hold ``{i}`` (layer index) and ``{p}`` (weight/bias), so one
    table serves both directions. A key that matches no pair raises: a converter that silently dropped a weight
    would give a model that only *almost* matches."""
    pairs = [(xarch, hf) if reverse else (hf, xarch) for hf, xarch in table]
    compiled = [(_template_regex(source), target) for source, target in pairs]
    out = {}
    for key, tensor in state_dict.items():
        for regex, target in compiled:
            match = regex.fullmatch(key)
            if match:
                out[target.format(**match.groupdict())] = tensor
                break
        else:
            raise ValueError(f"no conversion rule for the weight {key!r} (shape {tuple(tensor.shape)})")
    return out


__all__ = [
    "CONVERTERS",
    "ENCODER_HEADS",
    "XARCH_HEADS",
    "Converter",
    "StateDict",
    "activation_problems",
    "check_no_layer_sharing",
    "check_xarch_config",
    "heads",
    "mismatches",
    "qa_problems",
    "register_converter",
    "rename",
    "shared_config_kwargs",
    "shared_hf_kwargs",
    "unsupported",
]
