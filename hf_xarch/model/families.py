"""Every attention family's and position scheme's module, imported once so their records are complete (cache layer,
``init``) and registered with transformers. ``modeling_xarch`` imports this file; ``configuration_xarch`` imports
only ``specs.py``, the light records.

Adding a family or scheme: its spec file (one import line in ``specs.py``) and its module (one import line here).
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
from .position_t5 import T5RelativePositionBias  # noqa: F401
from .registry import ATTENTION_FAMILIES, ATTENTION_MODULES, POSITION_MODULES, POSITION_SCHEMES  # noqa: F401
from .transformers_private import register_family_with_transformers

for _family in ATTENTION_FAMILIES.values():  # now with their cache layers (the config registered their layer types)
    register_family_with_transformers(_family)
