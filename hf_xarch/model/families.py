"""Every attention family and position scheme, imported once so their registry entries exist.

Adding a family or scheme: write its file (decorated with ``register_attention`` / ``register_position``) and add
one import line here. ``configuration_xarch`` imports this file, so validation always sees the full registry.
"""

from .attention_bigbird import BigBirdAttention  # noqa: F401
from .attention_full import XArchAttention  # noqa: F401
from .attention_linear import LinearAttention, LinearSlidingAttention  # noqa: F401
from .attention_linformer import LinformerAttention  # noqa: F401
from .attention_lsh import LSHAttention  # noqa: F401
from .attention_performer import PerformerAttention  # noqa: F401
from .attention_sliding import SlidingWindowAttention  # noqa: F401
from .positions import LearnedPositionEmbedding, RotaryEmbedding, SinusoidalPositionEmbedding  # noqa: F401
from .position_alibi import AlibiPositionBias  # noqa: F401
from .registry import ATTENTION_FAMILIES, ATTENTION_MODULES, POSITION_MODULES, POSITION_SCHEMES  # noqa: F401
