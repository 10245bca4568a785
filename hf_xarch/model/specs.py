"""Every attention family's and position scheme's light record, imported once so that ``XArchConfig`` validates
against the full registry without importing any attention module, kernel or transformers' masking utilities.

A new family or scheme adds one import line here (its ``*_spec.py``, which calls ``register_family`` or
``register_position_scheme``) and one in ``families.py`` (its module, which completes the record).
"""

from .attention_bigbird_spec import BIGBIRD_FAMILY  # noqa: F401
from .attention_full_spec import FULL_FAMILY  # noqa: F401
from .attention_linear_spec import LINEAR_FAMILY, LINEAR_SLIDING_FAMILY  # noqa: F401
from .attention_linformer_spec import LINFORMER_FAMILY  # noqa: F401
from .attention_lsh_spec import LSH_FAMILY  # noqa: F401
from .attention_performer_spec import PERFORMER_FAMILY  # noqa: F401
from .attention_sliding_spec import SLIDING_FAMILY  # noqa: F401
from .position_specs import ALIBI_SCHEME  # noqa: F401
from .position_t5_spec import T5_SCHEME  # noqa: F401
from .registry import ATTENTION_FAMILIES, POSITION_SCHEMES  # noqa: F401
