"""transformers models <-> XArch models with identical outputs.

``from_hf(model)`` turns a transformers model (``BertForMaskedLM``, ``GPT2LMHeadModel``, ...) into the XArch model that
computes the same function: same logits, same hidden states, same generations. ``to_hf(model, target)`` goes back.
Each family is a ``Converter`` in ``hf_xarch/conversions/<family>.py``, found by ``config.model_type``; this module
only does what all families share: picking the head class, adding and stripping base-model prefixes, loading the
weights strictly (every weight mapped, none left over), and carrying the attention implementation, dtype, device,
train/eval mode and generation config across.

    >>> from transformers import GPT2LMHeadModel
    >>> from hf_xarch.convert import from_hf, to_hf
    >>> xarch = from_hf(GPT2LMHeadModel.from_pretrained("gpt2"))
    >>> gpt2_again = to_hf(xarch, target="gpt2")
"""

from __future__ import annotations

import copy
import logging

import transformers
from transformers.modeling_utils import PreTrainedModel

from hf_xarch.model import modeling_xarch, modeling_xarch_seq2seq
from hf_xarch.model.modeling_xarch import XArchPreTrainedModel

from .conversions import CONVERTERS, Converter
from .conversions.base import StateDict

logger = logging.getLogger(__name__)

XARCH_PREFIX = XArchPreTrainedModel.base_model_prefix + "."  # "model."


def converter_for(model_type: str) -> Converter:
    """The converter of a transformers ``model_type``; a ValueError that lists the supported ones otherwise."""
    if model_type not in CONVERTERS:
        raise ValueError(
            f"no XArch converter for model_type={model_type!r}; supported model types: {sorted(CONVERTERS)} "
            "(a new family is one file in hf_xarch/conversions/)"
        )
    return CONVERTERS[model_type]


def supported_classes() -> dict[str, list[str]]:
    """model_type -> the transformers classes ``from_hf`` accepts for it."""
    return {model_type: list(converter.heads) for model_type, converter in sorted(CONVERTERS.items())}


def is_base_model(model: PreTrainedModel) -> bool:
    """True for a bare stack (BertModel, GPT2Model, XArchModel), whose weights carry no base-model prefix."""
    return model.base_model is model


def head_layout(state_dict: StateDict, prefix: str) -> StateDict:
    """A bare model's weights with its base-model prefix added, as the same stack inside a head model has them."""
    return {prefix + key: tensor for key, tensor in state_dict.items()}


def load_converted(
    model: PreTrainedModel, converted: StateDict, prefix: str, droppable: tuple[str, ...], source: str
) -> None:
    """Load converted weights (head layout) into ``model`` strictly. Weights the model has no place for fail the
    conversion, except those under ``droppable`` prefixes (dropped with a warning: BertModel's pooler)."""
    if is_base_model(model):
        inside = {key[len(prefix) :]: tensor for key, tensor in converted.items() if key.startswith(prefix)}
        outside = sorted(key for key in converted if not key.startswith(prefix))
        converted = inside
    else:
        outside = []
    expected = set(model.state_dict())
    outside += sorted(set(converted) - expected)
    dropped = [key for key in outside if key.startswith(droppable)]
    leftover = [key for key in outside if not key.startswith(droppable)]
    missing = sorted(expected - set(converted))
    if leftover or missing:
        raise ValueError(
            f"converting {source} to {type(model).__name__}: weights without a place {leftover}, "
            f"weights not provided {missing}"
        )
    if dropped:
        logger.warning("%s has no place for %s of %s; they are dropped", type(model).__name__, dropped, source)
    model.load_state_dict({key: converted[key] for key in expected}, strict=True)


def finish(new: PreTrainedModel, old: PreTrainedModel) -> PreTrainedModel:
    """Carry dtype, device, train/eval mode and generation settings from ``old`` to ``new``."""
    new.to(device=old.device)
    new.train(old.training)
    if new.can_generate() and old.can_generate() and getattr(old, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(old.generation_config)
    return new


def carried_implementation(source: PreTrainedModel, target_class: type) -> str | None:
    """The attention implementation a converted model is built with: the source's, which the user chose or the
    source class defaulted to; ``None`` (the target class's default) when one side runs eager only (transformers' LED,
    Longformer, BigBird, BLOOM), where eager says nothing about what the user wants."""
    if not (type(source)._supports_sdpa and target_class._supports_sdpa):
        return None
    return source.config._attn_implementation


def from_hf(model: PreTrainedModel) -> XArchPreTrainedModel:
    """The XArch model that computes what the transformers ``model`` computes (same weights, same outputs).

    Raises ``ValueError`` naming what is not supported: a model type without a converter, a head class without an
    XArch counterpart, or an option of the family XArch cannot reproduce exactly. The attention implementation is
    ``model``'s, or XArch's default (sdpa) where transformers offers only eager (``carried_implementation``).
    """
    if isinstance(model, XArchPreTrainedModel):
        raise ValueError(f"{type(model).__name__} is already an XArch model")
    converter = converter_for(model.config.model_type)
    hf_class = type(model).__name__
    if hf_class not in converter.heads:
        raise ValueError(
            f"{hf_class} has no XArch counterpart; the {model.config.model_type} classes that convert are "
            f"{list(converter.heads)}"
        )
    name = converter.heads[hf_class]
    xarch_class = getattr(modeling_xarch, name, None) or getattr(modeling_xarch_seq2seq, name)
    config = converter.config_from_hf(model.config, hf_class)
    state_dict = model.state_dict()
    if is_base_model(model):
        state_dict = head_layout(state_dict, model.base_model_prefix + ".")
    converted = converter.state_dict_from_hf(state_dict, model.config, hf_class)
    xarch = xarch_class._from_config(config, attn_implementation=carried_implementation(model, xarch_class),
                                     dtype=model.dtype)
    load_converted(xarch, converted, XARCH_PREFIX, converter.droppable_prefixes, hf_class)
    return finish(xarch, model)


def resolve_target(model: XArchPreTrainedModel, target: str | type) -> tuple[Converter, str]:
    """``target`` as (converter, transformers class name): a class, a class name, or a model_type (the head is then
    the one that corresponds to ``model``'s class)."""
    xarch_class = type(model).__name__
    if isinstance(target, type):
        target = target.__name__
    if target in CONVERTERS:
        converter = CONVERTERS[target]
        # the class or the one it specializes (XArchSeq2SeqModel is the XArchModel of an encoder-decoder config)
        for name in [cls.__name__ for cls in type(model).__mro__]:
            for hf_class, xarch_name in converter.heads.items():
                if xarch_name == name:
                    return converter, hf_class
        raise ValueError(
            f"{xarch_class} has no {target} counterpart; {target} converts {sorted(set(converter.heads.values()))}"
        )
    for converter in CONVERTERS.values():
        if target in converter.heads:
            if converter.heads[target] not in [cls.__name__ for cls in type(model).__mro__]:
                raise ValueError(f"{target} corresponds to {converter.heads[target]}, not to {xarch_class}")
            return converter, target
    raise ValueError(
        f"to_hf target={target!r} is neither a supported model type {sorted(CONVERTERS)} nor one of the "
        f"transformers classes {supported_classes()}"
    )


def to_hf(model: XArchPreTrainedModel, target: str | type) -> PreTrainedModel:
    """The transformers model of family / class ``target`` (``"bert"``, ``"GPT2LMHeadModel"``, ``BertForMaskedLM``)
    that computes what the XArch ``model`` computes. Raises ``ValueError`` listing every XArch option the target
    family cannot express (pre-norm for BERT, RoPE for GPT-2, ...)."""
    if not isinstance(model, XArchPreTrainedModel):
        raise ValueError(f"to_hf expects an XArch model, got {type(model).__name__} (use from_hf for that direction)")
    converter, hf_class_name = resolve_target(model, target)
    hf_config = converter.config_to_hf(model.config, hf_class_name)
    state_dict = model.state_dict()
    if is_base_model(model):
        state_dict = head_layout(state_dict, XARCH_PREFIX)
    converted = converter.state_dict_to_hf(state_dict, model.config, hf_class_name)
    hf_class = getattr(transformers, hf_class_name)
    hf_model = hf_class._from_config(
        hf_config,
        attn_implementation=carried_implementation(model, hf_class),
        dtype=model.dtype,
        **converter.hf_init_kwargs.get(hf_class_name, {}),
    )
    load_converted(hf_model, converted, hf_model.base_model_prefix + ".", (), type(model).__name__)
    return finish(hf_model, model)


__all__ = ["from_hf", "to_hf", "converter_for", "supported_classes", "CONVERTERS"]
