"""XArchConfig: one config that chooses every part of an XArch transformer.

Field names follow transformers wherever the concept already exists there (``num_key_value_heads``,
``rope_parameters``, ``layer_types``, ``sliding_window``...). Every value is validated when the config is built and a
bad one raises ``ValueError`` naming the field, the value and what is allowed. Combinations are checked against the
capabilities that attention families and position schemes declare in the registry (``registry.py``).
Longer than 600 lines because of its docstring: every field is documented here, where ``help(XArchConfig)`` finds it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import logging

from .attention_sliding_spec import derived_sliding_window, sliding_layers
from .registry import attention_family_for_layer_type, config_error, declared_options
from .specs import ATTENTION_FAMILIES, POSITION_SCHEMES
from .transformers_private import register_family_with_transformers

logger = logging.get_logger(__name__)

NORM_TYPES = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLP_TYPES = ("plain", "gated")
CLASSIFIER_POOLINGS = ("first", "last", "mean")
OUTPUT_LAYERS = ("full", "adaptive")

for _family in ATTENTION_FAMILIES.values():
    register_family_with_transformers(_family)


def registered_options() -> dict[str, Any]:
    """Every option a registered family or position scheme declares in its record, with its default. They are not
    fields of ``XArchConfig``: given as keyword arguments they become attributes, and the default fills in otherwise."""
    options: dict[str, Any] = {}
    for record in (*ATTENTION_FAMILIES.values(), *POSITION_SCHEMES.values()):
        options.update(declared_options(record))
    return options


def _fail(field: str, value: Any, allowed: str) -> None:
    raise config_error(field, value, allowed)


# Fields filled in from others when not given: field -> (the fields it follows, its value from them). After
# construction, a field that still holds the value its sources gave (or None) follows them when they change
# (`XArchConfig.__setattr__`), so a changed source never leaves a stale value behind that breaks save or reload.
DERIVED_DEFAULTS = {
    "num_key_value_heads": (("num_attention_heads",), lambda c: c.num_attention_heads),
    "head_dim": (
        ("hidden_size", "num_attention_heads"),
        lambda c: c.hidden_size // c.num_attention_heads if c.hidden_size % c.num_attention_heads == 0 else None,
    ),
    "intermediate_size": (("hidden_size",), lambda c: 4 * c.hidden_size),
    "embedding_size": (("hidden_size",), lambda c: c.hidden_size),
    "qkv_bias": (("attention_bias",), lambda c: c.attention_bias),
    "final_norm": (("norm_position",), lambda c: c.norm_position == "pre"),
    "classifier_pooling": (("is_decoder",), lambda c: "last" if c.is_decoder else "first"),
    "initializer_range": (("hidden_size",), lambda c: c.hidden_size ** -0.5),
}
# the decoder's own fields of an encoder-decoder model (read only when is_encoder_decoder=True)
ENCODER_DECODER_FIELDS = ("num_decoder_layers", "decoder_attention_type", "decoder_layer_types",
                          "max_decoder_position_embeddings")
# the sliding-window family's options, which are fields of the config
SLIDING_OPTION_FIELDS = ("attention_window", "attention_dilation", "attention_sink_size", "global_projections")
# the fields `sliding_window` (the key slots a causal sliding layer reads) is computed from
SLIDING_WINDOW_SOURCES = {"attention_window", "attention_dilation", "layer_types", "attention_type", "num_hidden_layers",
                          "num_attention_heads"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value) -> bool:
    return _number(value) and value > 0


# rope_parameters values transformers' validation only warns about, although no rotation can be computed from them:
# key -> (test, what is allowed). A key that is absent (or None where transformers makes it optional) is not tested.
ROPE_VALUE_RULES = {
    "rope_theta": (_positive, "a positive number (the base of the rotation frequencies)"),
    "factor": (_positive, "a positive number (the context-length scale)"),
    "attention_factor": (_positive, "a positive number (the scale of cos and sin)"),
    "beta_fast": (_number, "a number"),
    "beta_slow": (_number, "a number"),
    "mscale": (_number, "a number"),
    "mscale_all_dim": (_number, "a number"),
    "low_freq_factor": (_positive, "a positive number"),
    "high_freq_factor": (_positive, "a positive number"),
    "original_max_position_embeddings": (lambda v: _positive(v) and isinstance(v, int), "a positive integer"),
    "partial_rotary_factor": (lambda v: _positive(v) and v <= 1, "a number in (0, 1] (the share of features rotated)"),
    "short_factor": (lambda v: isinstance(v, list) and all(_positive(x) for x in v), "a list of positive numbers"),
    "long_factor": (lambda v: isinstance(v, list) and all(_positive(x) for x in v), "a list of positive numbers"),
}
ROPE_OPTIONAL = {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "partial_rotary_factor"}


class XArchConfig(PreTrainedConfig):
    r"""Configuration of an XArch model (``model_type="xarch"``).

    Sizes:
        vocab_size (`int`, defaults to 32000): number of tokens.
        hidden_size (`int`, defaults to 768): width of the residual stream.
        num_hidden_layers (`int`, defaults to 12): number of layers (block applications; see `num_hidden_groups`).
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
        position_offset (`int`, defaults to 0): encoders: the position id of the first real token. fairseq's models
            (RoBERTa, XLM-RoBERTa) number real tokens from `pad_token_id + 1` and give every padding token (a 0 in
            `attention_mask`) position `pad_token_id`: that is `position_offset=pad_token_id + 1`, and with any offset
            above 0 padding takes position `position_offset - 1`. Only for `position_embedding_type` `learned` or
            `sinusoidal`; a `learned` table needs `max_position_embeddings > position_offset`.

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
        qkv_bias (`bool`, *optional*): biases of the query/key/value projections alone (transformers' name, as in
            ViT); `attention_bias` then sets the output projection's. Qwen2 is `qkv_bias=True, attention_bias=False`.
            Defaults to `attention_bias`.
        tie_word_embeddings (`bool`, defaults to `True`): share the input embedding with the LM output layer.
        train_pad_embedding (`bool`, defaults to `False`): `False` (BERT, Llama): the `pad_token_id` row of the token
            embeddings is `nn.Embedding`'s `padding_idx`, zero at init and never updated. `True` (GPT-2, whose pad
            token is often its EOS token): an ordinary trainable row, so a converted GPT-2 fine-tunes as GPT-2 does.

    Cross-layer sharing and the causal-LM output layer (Lan et al. 2020; Grave et al. 2017):
        num_hidden_groups (`int`, *optional*), inner_group_num (`int`, *optional*): ALBERT's parameter sharing.
            The stack holds `num_hidden_groups * inner_group_num` distinct blocks; each group has `inner_group_num`
            blocks applied in order, and consecutive layers share a group. Unlike ALBERT's `num_hidden_layers` (which
            counts group applications), ours counts block applications, the depth that caches, `layer_types` and
            `hidden_states` see: an ALBERT config is `num_hidden_layers = albert.num_hidden_layers * inner_group_num`.
            Must divide: `num_hidden_layers % (num_hidden_groups * inner_group_num) == 0`. Both default to no
            sharing (`inner_group_num=1`, `num_hidden_groups=num_hidden_layers // inner_group_num`); ALBERT's own
            default, one block for every layer, is `num_hidden_groups=1, inner_group_num=1`. Every application of a
            shared block keeps its own cache layer, and all applications of a block must have the same per-layer
            options (`layer_types`, `attention_window`, `attention_dilation`): the block is built once.
        output_layer (`str`, defaults to `"full"`): `full` (a V-way linear layer, tied or not) or `adaptive`
            (adaptive softmax through `torch.nn.AdaptiveLogSoftmaxWithLoss`; causal LMs only, `is_decoder=True`,
            untied: `tie_word_embeddings=False`). An adaptive `XArchForCausalLM` returns log-probabilities as `logits`.
        adaptive_cutoffs (`list[int]`, *optional*): the cluster boundaries of the adaptive softmax, increasing,
            each in `1..vocab_size-1` (ids are meant to be sorted by frequency: the first cutoff is the shortlist).
        adaptive_div_value (`float`, defaults to 4.0): each tail cluster's projection is `div_value` times narrower.

    Sliding window (`attention_type="sliding_window"`, Beltagy et al. 2020; read by sliding layers only):
        attention_window (`int` or `list[int]`, *optional*): keys a query sees, per model or one per layer (Longformer's
            meaning: an encoder query sees w/2 on each side, so w must be even there; a decoder query sees itself and
            the w-1 before it). Defaults to `sliding_window` if given, else 512.
        attention_dilation (`int`, `list[int]` or `list[list[int]]`, *optional*): spacing of those keys (Longformer's
            dilated window), per model, per layer, or per head of each layer. Defaults to 1 (contiguous).
        attention_sink_size (`int`, defaults to 0): decoders: the first k real tokens stay visible to every later
            token and stay cached (StreamingLLM's attention sinks, Xiao et al. 2023).
        global_projections (`bool`, defaults to `False`): separate query/key/value projections (`query_global`,
            `key_global`, `value_global`) for the rows of global tokens (`global_attention_mask`), as Longformer has.
        sliding_window (`int`, *optional*): derived, `(attention_window - 1) * max dilation + 1`: the key slots a
            causal sliding layer reads, which transformers' sliding-window cache keeps. One setting with
            `attention_window` under transformers' (Mistral's) name: give or set it (also after construction,
            `config.sliding_window = 8`) to make every sliding layer see that many keys (undilated only); given
            with `attention_window`, the two must agree. Changing the window fields updates it.
        `attention_dilation`, `attention_sink_size` and `global_projections` are read by sliding layers only: set on a
        model without them (or dilation on a layer that is not one) they raise. Encoders need even windows and take no
        sinks; decoders take no global projections.

    Performer (`attention_type="performer"`, Choromanski et al. 2021; read by performer layers only):
        performer_nb_features (`int`, *optional*): random features m per head; the error of the softmax estimate falls
            like 1/sqrt(m) and the cost grows like m. Defaults to `int(head_dim * ln(head_dim))` (the paper's choice).
        performer_kernel (`str`, defaults to `"softmax"`): `softmax` (FAVOR+ positive orthogonal random features, an
            unbiased estimate of softmax attention) or `relu` (the paper's generalised attention, relu(Wx) + 1e-3: not
            an estimate of softmax, a different attention).
        performer_redraw_interval (`int`, defaults to 0): redraw the random projection every this many training
            forwards (never in eval mode; 0 = never). Redraws are reproducible: the projection and its seed are saved.
        performer_feature_floor (`float`, *optional*): softmax kernel only. Every key feature gets this fraction of the
            largest exp(wᵀk) the query sees added, which mixes the estimate with uniform attention exactly where a few
            huge features make it noisy (large logits, few features) and leaves it unchanged otherwise (see "the
            feature floor" in `attention_performer_kernels.py`). Defaults to 1e-3 for `softmax` (measured in
            `benchmarks/bench_performer.py`: never worse than performer-pytorch's 1e-4 floor, and up to 2.4x better
            at logit std 0.5); 0 gives the unbiased FAVOR+ estimate. Not allowed with `relu`, which adds its own 1e-3.
        Performer cannot take an additive score bias (ALiBi); `attention_dropout` has no weights to drop in its layers
        (a nonzero value logs a warning).

    Linformer (`attention_type="linformer"`, Wang et al. 2020; encoder only; options in `attention_linformer_spec.py`):
        linformer_k (`int`, defaults to 256): keys and values are projected along the sequence to k rows: O(N·k).
        linformer_sharing (`str`, defaults to `"headwise"`): the paper's variants: `headwise` (one E and F per layer
            for all heads), `none` (one pair per key/value head), `key_value` (E = F) or `layerwise` (one E = F for
            every Linformer layer of the stack, held once by the model as `shared_attention`). Inputs may be up to
            `max_position_embeddings` long (the projections' width); shorter ones use their first columns.

    Reformer LSH (`attention_type="lsh"`, Kitaev et al. 2020; encoder only; options in `attention_lsh_spec.py`):
        num_hashes (`int`, defaults to 1), num_buckets (`int`, even, defaults to 64), lsh_chunk_length (`int`, defaults
            to 64): hash rounds, buckets per round and the chunk a sorted query attends within (plus the one before).
        hash_seed (`int`, *optional*): the seed of the random rotations (transformers' draw); None: each layer draws
            its own seed when built. The rotations are saved with the model either way.
        lsh_attend_across_buckets (`bool`, defaults to `False`): `False` masks keys of other buckets (the paper's
            rule); `True` lets a chunk see all its keys, as transformers' `LSHSelfAttention` does.

    Linear attention (`attention_type="linear"`, Katharopoulos et al. 2020) and its hybrid with a softmax window
    (`attention_type="linear_sliding"`, LoLCATs, Zhang et al. 2024); options in `attention_linear_spec.py`:
        linear_feature_map (`str`, defaults to `"hedgehog"`): the feature map φ per head: `hedgehog` (learned,
            softmax over [xW, -xW]), `t2r` (learned, relu(xW + b)), `elu` (elu + 1), `relu`, or `favor+` (the
            Performer's random features, unbiased; `linear` only). Learned maps are trained by `hf_xarch.linearize`.
        linear_feature_dim (`int`, *optional*): the width of W (hedgehog: 2x that many features), or favor+'s feature
            count; defaults to head_dim (favor+: head_dim * ln(head_dim)); not allowed for `elu` / `relu`.
        linear_window (`int`, defaults to 64): `linear_sliding` only: the nearest keys each query attends to with exact
            softmax (a decoder: itself and window - 1 before it; an encoder: window // 2 on each side).
        Neither takes ALiBi; `attention_dropout` has no weights to drop (a nonzero value logs a warning).

    Encoder-decoder (`is_encoder_decoder=True`; `XArchForConditionalGeneration`, T5 and BART's layout):
        is_encoder_decoder (`bool`, defaults to `False`): an encoder and a decoder with cross-attention. Every field
            above describes the encoder (any attention family, `layer_types`, global tokens, any position scheme) and
            `is_decoder` stays `False`; the decoder is the same model except for the fields below, with causal
            self-attention and full cross-attention over the encoder output. Token embeddings are shared by both
            stacks and tied to the LM head (`tie_word_embeddings`); factorized ones (`embedding_size`) too.
        num_decoder_layers (`int`, *optional*): decoder depth (T5's name); defaults to `num_hidden_layers`.
        decoder_attention_type (`str`, defaults to `"full"`): the attention family of every decoder layer; it needs a
            causal form. Family options (`attention_window`, ...) are shared with the encoder where both use the family.
        decoder_layer_types (`list[str]`, *optional*): per-layer attention of the decoder, as `layer_types`.
        max_decoder_position_embeddings (`int`, *optional*): the decoder's `max_position_embeddings` (LED's name: a
            long-input encoder with a short decoder table); defaults to `max_position_embeddings`.
        decoder_start_token_id (`int`, *optional*): the first decoder input, which `generate()` starts from and which
            labels are shifted behind (BART: `eos_token_id`, T5: `pad_token_id`).
        add_cross_attention (`bool`, defaults to `False`): a decoder (`is_decoder=True`) whose blocks also attend to
            `encoder_hidden_states`. Set on the decoder stack of an encoder-decoder model (`stack_config`).

    Training:
        hidden_dropout (`float`, defaults to 0.0), attention_dropout (`float`, defaults to 0.0),
        classifier_dropout (`float`, *optional*, defaults to `hidden_dropout`).
        initializer_range (`float`, *optional*): the std of the normal draw for every weight matrix and embedding;
            defaults to `hidden_size ** -0.5` (0.088 at width 128, 0.036 at 768), which starts each projection's output
            at about its input's scale and, with tied embeddings, the logits at std ~1. Small byte-level decoders
            trained for equal steps reach clearly lower loss with it than with transformers' usual 0.02 (0.02 is
            still what converted transformers models carry): `benchmarks/results/defaults.md`.
        classifier_pooling (`str`, *optional*): which token `XArchForSequenceClassification` reads: `first` (BERT's
            [CLS], through a tanh pooler), `last` (the last non-padding token, GPT-style) or `mean`; defaults to `last`
            for decoders and `first` for encoders.

    Derived fields follow their sources after construction: `num_key_value_heads`, `head_dim`, `intermediate_size`,
    `embedding_size`, `qkv_bias`, `final_norm` and `classifier_pooling` follow the fields they default from while they
    still hold that default, `layer_types` follows `attention_type` and `num_hidden_layers` while every layer has one
    type, and `sliding_window` follows the window fields; so a config changed after construction saves and reloads.
    Every check runs again when the config is saved and when a model is built from it.

    Family options, read only by the family that uses them: `attention_window`, `attention_dilation`,
    `sliding_window`, `performer_nb_features`, `performer_kernel`, `performer_redraw_interval`,
    `performer_feature_floor` (their issues).
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
    position_offset: int = 0
    # cross-layer sharing and the output layer (see "Cross-layer sharing and the causal-LM output layer" above)
    num_hidden_groups: int | None = None
    inner_group_num: int | None = None
    output_layer: str = "full"
    adaptive_cutoffs: list[int] | None = None
    adaptive_div_value: float = 4.0
    is_decoder: bool = False
    attention_type: str = "full"
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    # sliding window (see "Sliding window" above)
    attention_window: int | list[int] | None = None
    attention_dilation: int | list[int | list[int]] | None = None
    attention_sink_size: int = 0
    global_projections: bool = False
    # Performer (see "Performer" above)
    performer_nb_features: int | None = None
    performer_kernel: str = "softmax"
    performer_redraw_interval: int = 0
    performer_feature_floor: float | None = None
    position_embedding_type: str = "learned"
    rope_parameters: dict | None = None
    norm_type: str = "layernorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    final_norm: bool | None = None
    embedding_norm: bool = False
    mlp_type: str = "plain"
    attention_bias: bool = True
    qkv_bias: bool | None = None
    mlp_bias: bool = True
    tie_word_embeddings: bool = True
    train_pad_embedding: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None
    classifier_pooling: str | None = None
    initializer_range: float | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # encoder-decoder (see "Encoder-decoder" above)
    num_decoder_layers: int | None = None
    decoder_attention_type: str = "full"
    decoder_layer_types: list[str] | None = None
    max_decoder_position_embeddings: int | None = None
    decoder_start_token_id: int | None = None
    add_cross_attention: bool = False

    def __post_init__(self, **kwargs):
        self.check_booleans()
        self.check_sizes()
        for field in DERIVED_DEFAULTS:
            if getattr(self, field) is None:
                setattr(self, field, self.derived_default(field))
        if self.position_embedding_type == "rope" and not self.rope_parameters and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default"}
        user_rope = self.rope_parameters or kwargs.get("rope_scaling")
        if user_rope is not None and not isinstance(user_rope, dict):  # transformers would fail on it with an AttributeError
            _fail("rope_parameters", user_rope, "a dict in transformers' rope schema, e.g. {'rope_type': 'yarn', "
                  "'factor': 4.0}, or None")
        if self.position_embedding_type != "rope" and user_rope:
            _fail("rope_parameters", user_rope, "only with position_embedding_type='rope'")
        super().__post_init__(**kwargs)
        for field, default in registered_options().items():  # the registry's options not given: their defaults
            if field not in self.__dict__ and not hasattr(type(self), field):
                self._assign(**{field: copy.deepcopy(default)})
        # what follows is assigned with `_assign`: it derives values, which must not re-derive others (`__setattr__`)
        if self.position_embedding_type != "rope":
            self._assign(rope_parameters=None)  # transformers fills in a default rope dict; it means nothing here
        self._assign(layer_types=self.normalize_layer_types(self.layer_types))
        self.check_choices()
        self.check_combinations()
        self.check_position_offset()
        self._assign(**self.check_families())
        self.check_sharing_and_output_layer()
        if self.adaptive_cutoffs is not None:
            self._assign(adaptive_cutoffs=list(self.adaptive_cutoffs))
        self.validate_rope()
        self.check_encoder_decoder()

    # ---- derived fields: one setting, one field ----------------------------------------------------------------------
    def derived_default(self, field: str):
        """The value ``field`` takes from its sources (``DERIVED_DEFAULTS``); None while they are invalid."""
        try:
            return DERIVED_DEFAULTS[field][1](self)
        except (TypeError, ZeroDivisionError):  # a source that is itself invalid for now: validation names it
            return None

    def _assign(self, **values) -> None:
        """Set derived values without deriving again from them (``__setattr__`` does that for the caller's changes)."""
        for field, value in values.items():
            super().__setattr__(field, value)

    def __setattr__(self, key, value):
        """After construction, changing a field updates the fields derived from it, so the config stays one that saves
        and loads: each field of ``DERIVED_DEFAULTS`` that still holds its derived value (or None) follows its
        sources; ``layer_types`` follows ``attention_type`` and ``num_hidden_layers`` while all layers share one
        type; ``sliding_window`` follows the window fields, and setting it sets ``attention_window`` (one setting,
        two names); a new ``rope_parameters`` dict is standardized as transformers does at construction. Nothing is
        validated here, so several fields can be changed in turn; ``save_pretrained`` and model construction run
        every check (``check_all``)."""
        if not self.__dict__.get("_post_init_done"):  # transformers sets it when its __post_init__ is done
            super().__setattr__(key, value)
            return
        if key == "sliding_window":
            self.set_sliding_window(value)
            return
        followers = [
            field for field, (sources, _) in DERIVED_DEFAULTS.items()
            if key in sources and getattr(self, field) in (None, self.derived_default(field))
        ]
        layer_types = self.layer_types_after(key, value)
        # standardize_rope_params assigns the dict it standardized back: that assignment must not standardize again
        new_rope = key == "rope_parameters" and value is not self.__dict__.get("rope_parameters")
        super().__setattr__(key, value)
        self._assign(**{field: self.derived_default(field) for field in followers})
        if layer_types is not None:
            self._assign(layer_types=layer_types)
        if key in SLIDING_WINDOW_SOURCES:
            self.follow_sliding_window()
        if new_rope and isinstance(value, dict) and self.position_embedding_type == "rope":
            value.setdefault("rope_theta", self.default_theta)  # as transformers' convert_rope_params_to_dict does
            self.standardize_rope_params()

    def layer_types_after(self, key: str, value) -> list[str] | None:
        """``layer_types`` once ``key`` is set to ``value``, where it follows (None: it stays as it is)."""
        if key not in ("attention_type", "num_hidden_layers") or not isinstance(self.layer_types, list):
            return None
        if value == getattr(self, key):  # set again unchanged (a copy of the config...): nothing to follow
            return None
        kinds = set(self.layer_types)
        if len(kinds) != 1:
            if key == "attention_type":
                _fail("attention_type", value, f"set alone only on a model whose layers share one type; this one has "
                      f"layer_types={self.layer_types}: set layer_types instead")
            return None  # which type a mixed stack's new layers get is the caller's choice: validation names it
        if key == "attention_type":
            return [ATTENTION_FAMILIES[value].layer_type] * self.num_hidden_layers if value in ATTENTION_FAMILIES else None
        return [kinds.pop()] * value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def follow_sliding_window(self) -> None:
        try:
            span = derived_sliding_window(self)
        except (TypeError, ValueError, IndexError):  # fields mid-change (a list of the old length...): checks name them
            return
        if span is not None:  # without sliding layers nothing reads it: it keeps what was set
            self._assign(sliding_window=span)

    def set_sliding_window(self, value) -> None:
        """``config.sliding_window = n`` (transformers' and Mistral's name): every sliding layer sees n keys, so
        ``attention_window`` becomes n too. None gives it back its derived value."""
        if value is None:
            self._assign(sliding_window=None)
            self.follow_sliding_window()
            return
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            _fail("sliding_window", value, "a positive int (the key slots a causal sliding layer reads), or None")
        dilation = self.attention_dilation
        flat = dilation if isinstance(dilation, (list, tuple)) else [dilation]
        flat = [d for entry in flat for d in (entry if isinstance(entry, (list, tuple)) else [entry])]
        if sliding_layers(self) and set(flat) - {None, 1}:
            _fail("sliding_window", value, f"set only without dilation; with attention_dilation={dilation!r} it is "
                  "derived, (attention_window - 1) * max dilation + 1: set attention_window instead")
        self._assign(attention_window=value, sliding_window=value)

    # ---- validation ------------------------------------------------------------------------------------------------
    def check_all(self) -> None:
        """Every check ``__post_init__`` runs, on the config as it is now: ``validate()`` (``save_pretrained``) and
        model construction run it, so a field changed after construction fails there, never when loading again."""
        self.check_booleans()
        self.check_sizes()
        self.normalize_layer_types(self.layer_types)
        self.check_choices()
        self.check_combinations()
        self.check_position_offset()
        self.check_families()
        self.check_sharing_and_output_layer()
        self.validate_rope()
        self.check_encoder_decoder()

    def check_booleans(self) -> None:
        # transformers type-checks only its own fields, so a config.json with "is_decoder": "yes" would load as True
        for field, annotation in XArchConfig.__annotations__.items():
            if annotation in ("bool", "bool | None"):
                value = getattr(self, field)
                if not isinstance(value, bool) and not (value is None and annotation == "bool | None"):
                    _fail(field, value, "True or False" + (", or None" if annotation == "bool | None" else ""))

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
        if self.initializer_range is not None and not (
            isinstance(self.initializer_range, (int, float)) and self.initializer_range >= 0
        ):
            _fail("initializer_range", self.initializer_range, "a float >= 0, or None (hidden_size ** -0.5)")
        if self.qkv_bias is not None and not isinstance(self.qkv_bias, bool):
            _fail("qkv_bias", self.qkv_bias, "True, False, or None (the same as attention_bias)")

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
            # the field that chose this layer's family: attention_type, or layer_types where the layer differs from it
            chosen_by = ("attention_type", family.name) if family.name == self.attention_type \
                else ("layer_types", self.layer_types)
            if self.is_decoder and not family.causal:
                _fail(*chosen_by, f"{where} has no causal form, so it cannot be a decoder layer")
            if not self.is_decoder and not family.bidirectional:
                _fail(*chosen_by, f"{where} is causal only, so it needs is_decoder=True")
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
        weightless = sorted({family.name for family in self.layer_families() if not family.attention_weights})
        if self.attention_dropout and weightless:
            # a warning, not an error: configs converted from BERT & co. carry a nonzero attention_dropout, and a
            # saved Performer config with one must keep loading
            logger.warning_once(f"attention_dropout={self.attention_dropout} has no effect on the {weightless} layers "
                                "of this model: they form no attention weights to drop")

    def check_position_offset(self) -> None:
        offset = self.position_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            _fail("position_offset", offset, "an integer >= 0")
        if not offset:
            return
        if self.is_decoder and not self.add_cross_attention:
            # generate() numbers a causal LM's positions from 0 itself; an offset would hold only until the first
            # generate() call (an encoder-decoder's decoder counts its own positions: BART offsets both stacks by 2)
            _fail("position_offset", offset, "0 for a decoder (is_decoder=True); offsets are for encoders (RoBERTa) "
                  "and encoder-decoders (BART)")
        if self.position_embedding_type not in ("learned", "sinusoidal"):
            _fail("position_offset", offset,
                  f"0 with position_embedding_type={self.position_embedding_type!r} (offsets shift absolute "
                  "positions: 'learned' or 'sinusoidal')")
        if self.position_embedding_type == "learned" and offset >= self.max_position_embeddings:
            _fail("position_offset", offset,
                  f"below max_position_embeddings={self.max_position_embeddings} (the learned table's rows)")

    def check_rope_parameters(self) -> None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = self.rope_parameters
        if not isinstance(params, dict):
            _fail("rope_parameters", params, "a dict in transformers' rope schema")
        rope_type = params.get("rope_type", params.get("type", "default"))
        allowed = ["default", *ROPE_INIT_FUNCTIONS]
        if rope_type not in allowed:
            _fail("rope_parameters", params, f"rope_type one of {allowed}")
        for key, (valid, what) in ROPE_VALUE_RULES.items():
            value = params.get(key)
            if key in params and not (value is None and key in ROPE_OPTIONAL) and not valid(value):
                _fail("rope_parameters", params, f"{key}={value!r}; it must be {what}")
        try:
            PreTrainedConfig.validate_rope(self)
        except (KeyError, TypeError, AssertionError) as err:  # transformers raises KeyError for missing keys
            _fail("rope_parameters", params, f"transformers' rope schema for {rope_type!r}: {err}")
        rotary_pairs = int(self.head_dim * params.get("partial_rotary_factor", 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            if key in params and len(params[key]) != rotary_pairs:
                _fail("rope_parameters", params, f"{key} of {rotary_pairs} entries (one per rotated feature pair), "
                      f"got {len(params[key])}")
        if rope_type == "llama3" and not params["high_freq_factor"] > params["low_freq_factor"]:
            _fail("rope_parameters", params, "high_freq_factor above low_freq_factor (llama3 smooths between them)")
        if rope_type == "yarn" and (params.get("beta_fast") or 32) < (params.get("beta_slow") or 1):
            _fail("rope_parameters", params, "beta_fast (default 32) at least beta_slow (default 1)")

    def normalize_layer_types(self, layer_types: list[str] | None) -> list[str]:
        if layer_types is None:
            if self.attention_type not in ATTENTION_FAMILIES:
                _fail("attention_type", self.attention_type, f"one of {sorted(ATTENTION_FAMILIES)}")
            normalized = [ATTENTION_FAMILIES[self.attention_type].layer_type] * self.num_hidden_layers
        elif not isinstance(layer_types, (list, tuple)) or len(layer_types) != self.num_hidden_layers:
            _fail("layer_types", layer_types, f"a list of num_hidden_layers={self.num_hidden_layers} entries")
        else:
            normalized = [attention_family_for_layer_type(entry).layer_type for entry in layer_types]
        # transformers re-reads saved configs through its base class (Trainer's resume_from_checkpoint), whose
        # validation knows only its own layer types: ours must be in its list too
        for layer_type in set(normalized):  # also a family registered after this file was imported
            register_family_with_transformers(attention_family_for_layer_type(layer_type))
        return normalized

    def layer_families(self):
        """The attention family of each layer, in order."""
        return [attention_family_for_layer_type(entry) for entry in self.layer_types]

    # ---- cross-layer sharing (ALBERT) and the output layer (adaptive softmax) ----------------------------------------
    def block_schedule(self) -> list[int]:
        """The distinct block each layer applies, in ALBERT's order: layer `i` is inner block `i % inner_group_num` of
        group `(i // inner_group_num) // layers_per_group`. Without sharing this is `[0, 1, ..., L-1]`.

        `None` fields resolve here rather than in `__post_init__`, so a config whose `num_hidden_layers` is changed
        later never starts sharing blocks by accident."""
        inner = self.inner_group_num or 1
        group_applications = self.num_hidden_layers // inner  # ALBERT's num_hidden_layers
        groups = self.num_hidden_groups or group_applications
        per_group = group_applications // groups
        return [((i // inner) // per_group) * inner + i % inner for i in range(self.num_hidden_layers)]

    def check_sharing_and_output_layer(self) -> None:
        for field in ("num_hidden_groups", "inner_group_num"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                _fail(field, value, "a positive integer, or None (no sharing)")
        inner = self.inner_group_num or 1
        groups = self.num_hidden_groups or max(self.num_hidden_layers // inner, 1)
        if self.num_hidden_layers % (groups * inner):
            _fail(
                "num_hidden_layers",
                self.num_hidden_layers,
                f"a multiple of num_hidden_groups * inner_group_num = {groups} * {inner} = {groups * inner} "
                "(each group is applied a whole number of times, all groups equally often)",
            )
        # a shared block is built once, for its first layer, so every per-layer option must agree across its layers
        per_layer = {"layer_types": self.layer_types}
        for field in ("attention_window", "attention_dilation"):
            value = getattr(self, field, None)
            if isinstance(value, (list, tuple)) and len(value) == self.num_hidden_layers:
                per_layer[field] = value
        first_layer_of_block: dict[int, int] = {}
        for layer, block in enumerate(self.block_schedule()):
            first = first_layer_of_block.setdefault(block, layer)
            for field, values in per_layer.items():
                if values[layer] != values[first]:
                    _fail(
                        field,
                        values,
                        f"one value for layers that share a block; layers {first} and {layer} share block {block} "
                        f"but have {values[first]!r} and {values[layer]!r}",
                    )

        if self.output_layer not in OUTPUT_LAYERS:
            _fail("output_layer", self.output_layer, f"one of {list(OUTPUT_LAYERS)}")
        if self.output_layer != "adaptive":
            if self.adaptive_cutoffs is not None:
                _fail("adaptive_cutoffs", self.adaptive_cutoffs, "None unless output_layer='adaptive'")
            return
        if not self.is_decoder:
            _fail("output_layer", self.output_layer, "'adaptive' only for a causal LM (is_decoder=True)")
        if self.tie_word_embeddings:
            _fail(
                "tie_word_embeddings",
                self.tie_word_embeddings,
                "False with output_layer='adaptive' (its clusters are not one V x E matrix to share with the input "
                "embedding; tying the head cluster is not implemented)",
            )
        cutoffs = self.adaptive_cutoffs
        if (
            not isinstance(cutoffs, (list, tuple))
            or not cutoffs
            or any(isinstance(c, bool) or not isinstance(c, int) for c in cutoffs)
            or list(cutoffs) != sorted(set(cutoffs))
            or cutoffs[0] <= 0
            or cutoffs[-1] >= self.vocab_size
        ):
            _fail(
                "adaptive_cutoffs",
                cutoffs,
                f"a non-empty, strictly increasing list of integers in 1..vocab_size-1={self.vocab_size - 1}",
            )
        div = self.adaptive_div_value
        if isinstance(div, bool) or not isinstance(div, (int, float)) or div < 1:
            _fail("adaptive_div_value", div, "a number >= 1")
        if int(self.embedding_size // (div ** len(cutoffs))) < 1:
            _fail(
                "adaptive_div_value",
                div,
                f"small enough that the last of {len(cutoffs)} tail clusters keeps a width >= 1 "
                f"(embedding_size={self.embedding_size} // div_value**{len(cutoffs)} is 0)",
            )

    def check_families(self) -> dict:
        """Each registered family's and the position scheme's own checks (their registry records' ``validate``), and
        the options of a family or scheme the model does not use refused when not at their default (they would be
        silently ignored). Returns the values they derive (``__post_init__`` assigns them)."""
        used = {family.name for family in self.layer_families()}
        # an option two families share (one name, one default: the registry checks) is read if either is used
        read = {option for name in used for option in ATTENTION_FAMILIES[name].options}
        derived: dict = {}
        for family in ATTENTION_FAMILIES.values():
            if family.name not in used:
                self.refuse_unread_options(family, f"attention_type={family.name!r} layers, and no layer is one "
                                                   f"(layer_types={self.layer_types})", read)
            if family.validate is not None:
                derived.update(family.validate(self))
        for scheme in POSITION_SCHEMES.values():
            if scheme.name != self.position_embedding_type:
                self.refuse_unread_options(scheme, f"position_embedding_type={scheme.name!r}, and this model's is "
                                                   f"{self.position_embedding_type!r}")
            elif scheme.validate is not None:
                derived.update(scheme.validate(self))
        return derived

    def refuse_unread_options(self, record, reader: str, read: set = frozenset()) -> None:
        """Refuse a value other than the default for an option of ``record`` (a family or position scheme) that no
        part of this model reads (``read``: options a used family reads too)."""
        declared = declared_options(record)
        for option in record.options:
            if option in read:
                continue
            default = declared[option] if option in declared else getattr(type(self), option, None)
            value = getattr(self, option, default)
            if value != default:
                _fail(option, value, f"{default!r}: it is read only by {reader}")

    # ---- encoder-decoder --------------------------------------------------------------------------------------------
    def check_encoder_decoder(self) -> None:
        """The decoder fields: read only with ``is_encoder_decoder=True``, where the decoder's whole config
        (``stack_config("decoder")``) is built and checked now, its errors prefixed with ``decoder``."""
        if self.add_cross_attention and not self.is_decoder:
            _fail("add_cross_attention", True, "False unless is_decoder=True (cross-attention is a decoder's)")
        if not self.is_encoder_decoder:
            for field in ENCODER_DECODER_FIELDS:
                if getattr(self, field) != getattr(type(self), field):
                    _fail(field, getattr(self, field), f"{getattr(type(self), field)!r}: it is read only by "
                          "encoder-decoder models (is_encoder_decoder=True)")
            return
        if self.is_decoder:
            _fail("is_decoder", True, "False with is_encoder_decoder=True: the config describes the encoder, and the "
                  "decoder fields (num_decoder_layers, decoder_attention_type, decoder_layer_types) the decoder")
        if self.add_cross_attention:
            _fail("add_cross_attention", True, "False with is_encoder_decoder=True (the decoder stack sets it)")
        for field, default in (("num_decoder_layers", "num_hidden_layers"),
                               ("max_decoder_position_embeddings", "max_position_embeddings")):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                _fail(field, value, f"a positive integer, or None ({default})")
        if self.decoder_attention_type not in ATTENTION_FAMILIES:
            _fail("decoder_attention_type", self.decoder_attention_type, f"one of {sorted(ATTENTION_FAMILIES)}")
        if self.output_layer != "full":
            _fail("output_layer", self.output_layer, "'full' for an encoder-decoder")
        try:
            self.stack_config("decoder")
        except ValueError as err:
            raise ValueError(f"decoder of this encoder-decoder (num_decoder_layers, decoder_attention_type, "
                             f"decoder_layer_types and the options it shares with the encoder): {err}") from None

    def stack_config(self, stack: str) -> XArchConfig:
        """The config of one stack of an encoder-decoder: ``"encoder"`` (this config as a plain encoder) or
        ``"decoder"`` (``num_decoder_layers`` causal layers of ``decoder_attention_type`` / ``decoder_layer_types``
        with cross-attention; the options of families it does not use at their defaults). Built anew on each call."""
        values = self.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path"):
            values.pop(key, None)
        values.update({field: getattr(type(self), field) for field in ENCODER_DECODER_FIELDS}, is_encoder_decoder=False)
        if stack == "decoder":
            values.update(
                is_decoder=True,
                add_cross_attention=True,
                num_hidden_layers=self.num_decoder_layers or self.num_hidden_layers,
                max_position_embeddings=self.max_decoder_position_embeddings or self.max_position_embeddings,
                attention_type=self.decoder_attention_type,
                layer_types=self.decoder_layer_types,
                sliding_window=None,  # derived again for the decoder's layers
                classifier_pooling=None,
                global_projections=False,  # they serve global tokens, which only encoders have
            )
            layer_types = self.decoder_layer_types or [self.decoder_attention_type] * values["num_hidden_layers"]
            values.update(self.unused_option_defaults({attention_family_for_layer_type(entry).name
                                                       for entry in layer_types}))
        elif stack != "encoder":
            raise ValueError(f"stack_config: stack={stack!r}; use 'encoder' or 'decoder'")
        config = type(self)(**values)
        config._attn_implementation_internal = self._attn_implementation_internal
        return config

    def unused_option_defaults(self, used: set[str]) -> dict[str, Any]:
        """The default of every option that only families outside ``used`` (family names) read, the sliding-window
        fields included (config fields, not declared in its record): what a config whose layers are ``used`` takes
        so that no option of this one is refused as unread (``check_families``)."""
        read = {option for name in used for option in ATTENTION_FAMILIES[name].options}
        defaults = {}
        for family in ATTENTION_FAMILIES.values():
            if family.name not in used:
                declared = declared_options(family)
                defaults.update({option: declared.get(option, getattr(type(self), option, None))
                                 for option in family.options if option not in read})
        if "sliding_window" not in used:
            defaults.update({field: getattr(type(self), field) for field in SLIDING_OPTION_FIELDS})
        return defaults

    def get_text_config(self, decoder=None, encoder=None):
        """transformers asks this for the decoder's config (``generate()`` builds its caches from it): an
        encoder-decoder answers with its stacks' configs."""
        if self.is_encoder_decoder and bool(decoder) != bool(encoder):
            return self.stack_config("decoder" if decoder else "encoder")
        return super().get_text_config(decoder=decoder, encoder=encoder)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """transformers sets the overrides given to ``from_pretrained`` with ``setattr`` after building the config,
        so they would skip validation and the fields derived from them would keep their saved values (the saved
        ``layer_types`` would win over ``attention_type="performer"``). Here every override of one of our fields goes
        into the dict before the config is built, and the saved values derived from it are dropped: ``layer_types``
        (when ``attention_type`` is given without it; a saved local/global mix then raises, since which layers to
        swap is the caller's choice) and ``sliding_window`` (when ``attention_window`` or ``attention_dilation``
        is given without it)."""
        ours = set(cls.__annotations__) | set(registered_options())
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in ours}
        config_dict = dict(config_dict)
        if "attention_type" in overrides and "layer_types" not in overrides:
            saved = config_dict.get("layer_types")
            if saved and len(set(saved)) > 1:
                _fail("attention_type", overrides["attention_type"],
                      f"given alone only for a model whose layers share one type; this one has layer_types={saved}: "
                      "pass layer_types as well")
            config_dict["layer_types"] = None
        if {"attention_window", "attention_dilation"} & overrides.keys() and "sliding_window" not in overrides:
            config_dict.pop("sliding_window", None)
        if "sliding_window" in overrides and "attention_window" not in overrides:
            config_dict.pop("attention_window", None)  # one setting, two names: the override sets both
        config_dict.update(overrides)
        return super().from_dict(config_dict, **kwargs)

    # transformers' strict validation (run again at save time) checks `layer_types` against its own list; ours come
    # from the registry, so validate them there instead.
    def validate_layer_type(self):
        self.normalize_layer_types(self.layer_types)

    def validate_architecture(self):
        self.check_all()

    def validate_rope(self):
        if self.position_embedding_type == "rope":
            self.check_rope_parameters()

    def validate(self) -> None:
        """Run every ``validate_*`` check, ours where we override one. transformers' ``validate`` (from huggingface_hub's
        ``@strict`` on PreTrainedConfig, called by ``save_pretrained``) holds PreTrainedConfig's own functions, so without
        this the overrides above never ran at save time, and a registry layer type outside transformers' list (a
        Performer layer's ``"performer_attention"``) could not be saved."""
        for validator in PreTrainedConfig.__class_validators__:
            getattr(self, validator.__name__)()
