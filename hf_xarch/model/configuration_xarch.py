"""XArchConfig: one config that chooses every part of an XArch transformer.

Field names follow transformers wherever the concept already exists there (``num_key_value_heads``,
``rope_parameters``, ``layer_types``, ``sliding_window``...). Every value is validated when the config is built and a
bad one raises ``ValueError`` naming the field, the value and what is allowed. Combinations are checked against the
capabilities that attention families and position schemes declare in the registry (``registry.py``).
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PreTrainedConfig

from .families import ATTENTION_FAMILIES, POSITION_SCHEMES
from .registry import attention_family_for_layer_type

NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLP_TYPES = ("plain", "gated")
CLASSIFIER_POOLINGS = ("first", "last", "mean")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"XArchConfig.{field}={value!r} is not allowed: {allowed}")


class XArchConfig(PreTrainedConfig):
    r"""Configuration of an XArch model (``model_type="xarch"``).

    Sizes:
        vocab_size (`int`, defaults to 32000): number of tokens.
        hidden_size (`int`, defaults to 768): width of the residual stream.
        num_hidden_layers (`int`, defaults to 12): number of blocks.
        num_attention_heads (`int`, defaults to 12): query heads.
        num_key_value_heads (`int`, *optional*): key/value heads; fewer than `num_attention_heads` is GQA, 1 is MQA.
            Defaults to `num_attention_heads` (multi-head attention).
        head_dim (`int`, *optional*): width of one head; defaults to `hidden_size // num_attention_heads`.
        intermediate_size (`int`, *optional*): MLP width; defaults to `4 * hidden_size`.
        max_position_embeddings (`int`, defaults to 2048): the longest sequence a `learned` position table holds, and
            the training length rope scalings refer to.
        embedding_size (`int`, *optional*): width of the token embeddings; smaller than `hidden_size` factorizes them
            (ALBERT) with a projection to `hidden_size`. Defaults to `hidden_size`.
        type_vocab_size (`int`, defaults to 0): number of token-type (segment) embeddings, as BERT has; 0 for none.

    Stack:
        is_decoder (`bool`, defaults to `False`): causal (decoder) when `True`, bidirectional (encoder) otherwise.
            `XArchForCausalLM` always sets it to `True`.
        attention_type (`str`, defaults to `"full"`): the attention family of every layer (see `ATTENTION_FAMILIES`).
        layer_types (`list[str]`, *optional*): per-layer attention, as family names or transformers' layer-type names
            (`"full_attention"`, ...); stored in transformers' vocabulary so transformers' caches understand it.
        position_embedding_type (`str`, defaults to `"learned"`): `learned`, `sinusoidal`, `rope`, `none` (and the
            schemes later registered, see `POSITION_SCHEMES`).
        rope_parameters (`dict`, *optional*): transformers' rope schema, e.g. `{"rope_type": "linear", "factor": 4.0}`;
            only with `position_embedding_type="rope"`. Defaults to `{"rope_type": "default", "rope_theta": 10000.0}`.
        norm_type (`str`, defaults to `"layernorm"`): `layernorm` or `rmsnorm`.
        norm_position (`str`, defaults to `"pre"`): `pre` (GPT-2, Llama) or `post` (BERT, the original Transformer).
        norm_eps (`float`, defaults to 1e-5): epsilon of every norm.
        final_norm (`bool`, *optional*): a norm after the last block; defaults to `True` for pre-norm, `False` for post.
        embedding_norm (`bool`, defaults to `False`): a norm on the embeddings (BERT, BLOOM).
        mlp_type (`str`, defaults to `"plain"`): `plain` (act(x W1) W2) or `gated` (SwiGLU-style, act(x Wg) * x Wu).
        hidden_act (`str`, defaults to `"gelu"`): any name in transformers' `ACT2FN`.
        attention_bias (`bool`, defaults to `True`), mlp_bias (`bool`, defaults to `True`): biases of the projections.
        tie_word_embeddings (`bool`, defaults to `True`): share the input embedding with the LM output layer.

    Training:
        hidden_dropout (`float`, defaults to 0.0), attention_dropout (`float`, defaults to 0.0),
        classifier_dropout (`float`, *optional*, defaults to `hidden_dropout`), initializer_range (`float`, 0.02).
        classifier_pooling (`str`, *optional*): which token `XArchForSequenceClassification` reads: `first` (BERT's
            [CLS], through a tanh pooler), `last` (the last non-padding token, GPT-style) or `mean`; defaults to `last`
            for decoders and `first` for encoders.

    Family options, read only by the family that uses them: `attention_window`, `attention_dilation`,
    `sliding_window`, `performer_nb_features`, `performer_kernel`, `performer_redraw_interval` (their issues).
    """

    model_type = "xarch"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    embedding_size: int | None = None
    type_vocab_size: int = 0
    is_decoder: bool = False
    attention_type: str = "full"
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    position_embedding_type: str = "learned"
    rope_parameters: dict | None = None
    norm_type: str = "layernorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    final_norm: bool | None = None
    embedding_norm: bool = False
    mlp_type: str = "plain"
    attention_bias: bool = True
    mlp_bias: bool = True
    tie_word_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None
    classifier_pooling: str | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self.check_sizes()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        if self.final_norm is None:
            self.final_norm = self.norm_position == "pre"
        if self.classifier_pooling is None:
            self.classifier_pooling = "last" if self.is_decoder else "first"
        if self.position_embedding_type == "rope" and not self.rope_parameters and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default"}
        user_rope = self.rope_parameters or kwargs.get("rope_scaling")
        if self.position_embedding_type != "rope" and user_rope:
            _fail("rope_parameters", user_rope, "only with position_embedding_type='rope'")
        super().__post_init__(**kwargs)
        if self.position_embedding_type != "rope":
            self.rope_parameters = None  # transformers fills in a default rope dict; it means nothing here
        self.layer_types = self.normalize_layer_types(self.layer_types)
        self.check_choices()
        self.check_combinations()
        if self.position_embedding_type == "rope":
            self.check_rope_parameters()

    # ---- validation ------------------------------------------------------------------------------------------------
    def check_sizes(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(field, value, "a positive integer")
        for field in ("num_key_value_heads", "head_dim", "intermediate_size", "embedding_size"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                _fail(field, value, "a positive integer or None (derived)")
        if isinstance(self.type_vocab_size, bool) or not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            _fail("type_vocab_size", self.type_vocab_size, "an integer >= 0 (0: no token types)")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            _fail(
                "hidden_size",
                self.hidden_size,
                f"a multiple of num_attention_heads={self.num_attention_heads} (or set head_dim explicitly)",
            )
        kv = self.num_key_value_heads
        if kv is not None and (kv > self.num_attention_heads or self.num_attention_heads % kv):
            _fail(
                "num_key_value_heads",
                kv,
                f"a divisor of num_attention_heads={self.num_attention_heads} (1 = MQA, equal = multi-head)",
            )
        for field in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                _fail(field, value, "a probability in [0, 1)")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            _fail("norm_eps", self.norm_eps, "a positive float")
        if not (isinstance(self.initializer_range, (int, float)) and self.initializer_range >= 0):
            _fail("initializer_range", self.initializer_range, "a float >= 0")

    def check_choices(self) -> None:
        from transformers.activations import ACT2FN

        choices = {
            "attention_type": tuple(ATTENTION_FAMILIES),
            "position_embedding_type": tuple(POSITION_SCHEMES),
            "norm_type": NORM_TYPES,
            "norm_position": NORM_POSITIONS,
            "mlp_type": MLP_TYPES,
            "classifier_pooling": CLASSIFIER_POOLINGS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                _fail(field, getattr(self, field), f"one of {list(allowed)}")
        if self.hidden_act not in ACT2FN:
            _fail("hidden_act", self.hidden_act, f"a name in transformers' ACT2FN, e.g. {sorted(ACT2FN)[:8]}...")

    def check_combinations(self) -> None:
        scheme = POSITION_SCHEMES[self.position_embedding_type]
        for index, family in enumerate(self.layer_families()):
            where = f"layer {index} ({family.name!r})"
            if self.is_decoder and not family.causal:
                _fail("attention_type", family.name, f"{where} has no causal form, so it cannot be a decoder layer")
            if not self.is_decoder and not family.bidirectional:
                _fail("attention_type", family.name, f"{where} is causal only, so it needs is_decoder=True")
            if scheme.kind == "bias" and not family.additive_position_bias:
                _fail(
                    "position_embedding_type",
                    self.position_embedding_type,
                    f"{where} cannot add a score bias; use rope, learned, sinusoidal or none with it",
                )
            if scheme.kind == "rotary" and not family.rotary:
                _fail("position_embedding_type", self.position_embedding_type, f"{where} cannot rotate q and k")
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            _fail("head_dim", self.head_dim, "an even number with rope (features rotate in pairs)")

    def check_rope_parameters(self) -> None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if not isinstance(self.rope_parameters, dict):
            _fail("rope_parameters", self.rope_parameters, "a dict in transformers' rope schema")
        rope_type = self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))
        allowed = ["default", *ROPE_INIT_FUNCTIONS]
        if rope_type not in allowed:
            _fail("rope_parameters", self.rope_parameters, f"rope_type one of {allowed}")
        try:
            self.standardize_rope_params()
            self.validate_rope()
        except (KeyError, TypeError, AssertionError) as err:  # transformers raises KeyError for missing keys
            _fail("rope_parameters", self.rope_parameters, f"transformers' rope schema for {rope_type!r}: {err}")

    def normalize_layer_types(self, layer_types: list[str] | None) -> list[str]:
        if layer_types is None:
            if self.attention_type not in ATTENTION_FAMILIES:
                _fail("attention_type", self.attention_type, f"one of {sorted(ATTENTION_FAMILIES)}")
            return [ATTENTION_FAMILIES[self.attention_type].layer_type] * self.num_hidden_layers
        if not isinstance(layer_types, (list, tuple)) or len(layer_types) != self.num_hidden_layers:
            _fail("layer_types", layer_types, f"a list of num_hidden_layers={self.num_hidden_layers} entries")
        return [attention_family_for_layer_type(entry).layer_type for entry in layer_types]

    def layer_families(self):
        """The attention family of each layer, in order."""
        return [attention_family_for_layer_type(entry) for entry in self.layer_types]

    # transformers' strict validation (run again at save time) checks `layer_types` against its own list; ours come
    # from the registry, so validate them there instead.
    def validate_layer_type(self):
        self.normalize_layer_types(self.layer_types)

    def validate_architecture(self):
        self.check_sizes()
