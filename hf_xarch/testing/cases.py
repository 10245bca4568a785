"""The combinations an attention family is checked in, their tiny configs and inputs, and temporary registration.

A case is one (family, position scheme, encoder or decoder) that the family's capability flags allow; its config is a
tiny random model in the spirit of transformers' model testers (hidden 32, 2 layers, vocab 99), with grouped-query
heads and whatever the caller overrides.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..model.configuration_xarch import XArchConfig
from ..model.registry import (
    ATTENTION_FAMILIES,
    ATTENTION_MODULES,
    POSITION_SCHEMES,
    AttentionFamily,
    PositionScheme,
    register_attention,
)

TINY = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "pad_token_id": 0,
}


def allowed(family: AttentionFamily, scheme: PositionScheme, decoder: bool) -> bool:
    """Whether the family's capability flags allow this position scheme in a decoder (or an encoder)."""
    if not (family.causal if decoder else family.bidirectional):
        return False
    if scheme.kind == "bias":
        return family.additive_position_bias
    if scheme.kind == "rotary":
        return family.rotary
    return True


@dataclass(frozen=True)
class FamilyCase:
    """One combination: ``family`` with ``position`` in a decoder (``decoder=True``) or an encoder, plus overrides."""

    family: str
    position: str
    decoder: bool
    overrides: tuple[tuple[str, object], ...] = field(default=(), compare=False)
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.family}-{self.position}-{'decoder' if self.decoder else 'encoder'}"

    @property
    def record(self) -> AttentionFamily:
        return ATTENTION_FAMILIES[self.family]

    def config(self, **more) -> XArchConfig:
        values = {**TINY, **dict(self.overrides), "attention_type": self.family,
                  "position_embedding_type": self.position, "is_decoder": self.decoder, **more}
        return XArchConfig(**values)

    def generator(self, salt: str = "") -> torch.Generator:
        """A seed of its own for every case and purpose (stable from run to run)."""
        return torch.Generator().manual_seed(zlib.crc32(f"{self.id}/{salt}".encode()) + self.seed)

    def model(self, model_class=None):
        """A random model of this case in eval mode (no dropout, no Performer redraws); ``XArchModel`` by default."""
        from ..model.modeling_xarch import XArchModel

        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=self.generator("weights"))))
        return (model_class or XArchModel)(self.config()).eval()

    def ids(self, batch: int, length: int, salt: str = "ids") -> torch.Tensor:
        """Random token ids, never the padding id (a padded position holds a real-looking token: padding must be
        ignored because of the mask, not because of the id)."""
        vocab = self.config().vocab_size
        return torch.randint(1, vocab, (batch, length), generator=self.generator(salt))


def family_cases(name: str | None = None, seed: int = 0, **config_overrides) -> list[FamilyCase]:
    """Every combination the registry allows: each registered family (or only ``name``) x each position scheme its
    flags accept x encoder/decoder as its flags allow. ``position_embedding_type`` or ``is_decoder`` among the
    overrides restrict the cases to that value."""
    if name is not None and name not in ATTENTION_FAMILIES:
        raise ValueError(f"check_attention_family: name={name!r} is not a registered family; registered: "
                         f"{sorted(ATTENTION_FAMILIES)}")
    families = [ATTENTION_FAMILIES[name]] if name is not None else list(ATTENTION_FAMILIES.values())
    positions = [config_overrides.pop("position_embedding_type")] if "position_embedding_type" in config_overrides \
        else list(POSITION_SCHEMES)
    decoders = [bool(config_overrides.pop("is_decoder"))] if "is_decoder" in config_overrides else [True, False]
    for field_name in ("attention_type", "layer_types"):
        if field_name in config_overrides:
            raise ValueError(f"check_attention_family: {field_name} is set by the kit (one family per case); "
                             f"got {field_name}={config_overrides[field_name]!r}")
    overrides = tuple(sorted(config_overrides.items()))
    return [
        FamilyCase(family.name, position, decoder, overrides, seed)
        for family in families
        for position in positions
        for decoder in decoders
        if allowed(family, POSITION_SCHEMES[position], decoder)
    ]


@contextmanager
def registered_family(module_cls: type, family: AttentionFamily) -> Iterator[type]:
    """Register ``module_cls`` as ``family`` for the ``with`` block only, then restore the registry as it was: for
    families that must not outlive a test (a deliberately broken one, or one a test module defines)."""
    previous = (ATTENTION_FAMILIES.get(family.name), ATTENTION_MODULES.get(family.name))
    register_attention(family)(module_cls)
    try:
        yield module_cls
    finally:
        if previous[0] is None:
            ATTENTION_FAMILIES.pop(family.name, None)
            ATTENTION_MODULES.pop(family.name, None)
        else:
            ATTENTION_FAMILIES[family.name], ATTENTION_MODULES[family.name] = previous
