"""Converters between transformers model families and XArch, one file per family.

Adding a family (Llama, BLOOM, ALBERT...): write ``conversions/<family>.py`` that builds a ``Converter`` (see
``base.py``) from one config table (``fields.ConfigTable``) and one weight table, each read by both directions, and
calls ``register_converter`` on it, then add one import line below. A family built like one already here reuses its
shape, field vocabulary and helpers (``fields.py``; ``roberta_converter``, ``llama.llama_config``...). ``hf_xarch.convert.from_hf`` / ``to_hf`` find it by ``config.model_type``.
"""

from .base import CONVERTERS, Converter, register_converter

# one line per family: importing the module registers its converter
from . import albert  # noqa: E402, F401
from . import bart  # noqa: E402, F401
from . import big_bird  # noqa: E402, F401
from . import bert  # noqa: E402, F401
from . import bloom  # noqa: E402, F401
from . import gpt2  # noqa: E402, F401
from . import led  # noqa: E402, F401
from . import llama  # noqa: E402, F401
from . import longformer  # noqa: E402, F401
from . import mistral  # noqa: E402, F401
from . import distilbert  # noqa: E402, F401
from . import qwen2  # noqa: E402, F401
from . import roberta  # noqa: E402, F401
from . import t5  # noqa: E402, F401

__all__ = ["CONVERTERS", "Converter", "register_converter"]
