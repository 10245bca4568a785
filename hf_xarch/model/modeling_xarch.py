"""XArch models: the embeddings, the block, the stack and the task heads.

Reads like transformers' Llama and BERT files: one block class whose attention is chosen per layer from the registry
(``ATTENTION_MODULES``), positions from ``POSITION_MODULES``, masks from transformers' masking utilities, caches from
transformers' cache classes, and the heads as transformers' own heads compute their losses. Longer than 600 lines
because it holds the six heads, as transformers' modeling files do: a reader finds the whole model in one file.

Everything this file imports from the package is a sibling (``from .x import Y``) so that ``save_pretrained`` copies
a self-contained set of files next to the weights (the README's "Sharing models").
"""

from typing import NamedTuple

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .adaptive_softmax import AdaptiveSoftmaxHead
from .attention_cross import XArchCrossAttention
from .attention_full import XArchAttention
from .attention_sliding_native import fetch_kernel_source, save_kernel_source
from .cache_quantized import XArchQuantizedCache
from .configuration_xarch import XArchConfig
from .families import ATTENTION_MODULES, POSITION_MODULES, POSITION_SCHEMES
from .registry import attention_family_for_layer_type
from .transformers_private import QuantizedCacheGeneration

logger = logging.get_logger(__name__)


class XArchRMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as Llama's is."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


def make_norm(config: XArchConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm_type == "rmsnorm":
        return XArchRMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


class XArchEmbeddings(nn.Module):
    """Token (+ absolute position) (+ token type) embeddings -> optional norm -> dropout -> optional E->H projection.

    With ``embedding_size < hidden_size`` the table is V×E and a projection lifts it to the hidden size (ALBERT's
    factorization, Lan et al. 2020): the embedding parameters fall from V·H to V·E + E·H.
    """

    def __init__(self, config: XArchConfig):
        super().__init__()
        padding_idx = None if config.train_pad_embedding else config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx)
        scheme = POSITION_SCHEMES[config.position_embedding_type]
        self.position_embeddings = POSITION_MODULES[scheme.name](config) if scheme.kind == "absolute" else None
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.embedding_size) if config.type_vocab_size else None
        )
        self.norm = make_norm(config, config.embedding_size) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.projection = (
            nn.Linear(config.embedding_size, config.hidden_size)
            if config.embedding_size != config.hidden_size
            else None
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            if not torch.compiler.is_compiling() and input_ids.numel() and (
                int(input_ids.max()) >= self.word_embeddings.num_embeddings or int(input_ids.min()) < 0
            ):
                raise ValueError(
                    f"input_ids holds token id {int(input_ids.max())}, outside the vocabulary "
                    f"(vocab_size={self.word_embeddings.num_embeddings}: ids 0..{self.word_embeddings.num_embeddings - 1})"
                )
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(embeddings, position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids were given, but the model has none (type_vocab_size=0)")
        if self.norm is not None:
            embeddings = self.norm(embeddings)
        embeddings = self.dropout(embeddings)
        if self.projection is not None:
            embeddings = self.projection(embeddings)
        return embeddings


class XArchMLP(nn.Module):
    """plain: down(act(up(x))) (BERT, GPT-2); gated: down(act(gate(x)) * up(x)) (Shazeer 2020, SwiGLU with silu)."""

    def __init__(self, config: XArchConfig):
        super().__init__()
        self.gated = config.mlp_type == "gated"
        bias = config.mlp_bias
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


class XArchBlock(GradientCheckpointingLayer):
    """Attention (+ cross-attention to the encoder, in an encoder-decoder's decoder) + MLP with residuals; pre-norm
    (x + f(norm(x))) or post-norm (norm(x + f(x)))."""

    def __init__(self, config: XArchConfig, layer_idx: int):
        super().__init__()
        family = attention_family_for_layer_type(config.layer_types[layer_idx])
        self.pre_norm = config.norm_position == "pre"
        self.attention = ATTENTION_MODULES[family.name](config, layer_idx)
        self.attention_norm = make_norm(config)
        if config.add_cross_attention:
            self.cross_attention = XArchCrossAttention(config, layer_idx)
            self.cross_attention_norm = make_norm(config)
        self.mlp = XArchMLP(config)
        self.mlp_norm = make_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings=None,
        cache: Cache | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask=None,
        cross_cache: EncoderDecoderCache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        # the positions' own arguments (rotary, score bias) are self-attention's; cross-attention takes neither
        cross_kwargs = {k: v for k, v in kwargs.items() if k not in ("score_bias", "position_ids")}
        if self.pre_norm:
            attended, _ = self.attention(self.attention_norm(hidden_states), attention_mask, position_embeddings, cache, **kwargs)
            hidden_states = hidden_states + self.dropout(attended)
            if encoder_hidden_states is not None:
                attended, _ = self.cross_attention(self.cross_attention_norm(hidden_states), encoder_hidden_states,
                                                   encoder_attention_mask, cross_cache, **cross_kwargs)
                hidden_states = hidden_states + self.dropout(attended)
            return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        attended, _ = self.attention(hidden_states, attention_mask, position_embeddings, cache, **kwargs)
        hidden_states = self.attention_norm(hidden_states + self.dropout(attended))
        if encoder_hidden_states is not None:
            attended, _ = self.cross_attention(hidden_states, encoder_hidden_states, encoder_attention_mask,
                                               cross_cache, **cross_kwargs)
            hidden_states = self.cross_attention_norm(hidden_states + self.dropout(attended))
        return self.mlp_norm(hidden_states + self.dropout(self.mlp(hidden_states)))


class XArchPreTrainedModel(PreTrainedModel):
    config_class = XArchConfig
    config: XArchConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["XArchBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": XArchBlock,
        "attentions": XArchAttention,
        "cross_attentions": XArchCrossAttention,
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # an attention family's or position scheme's own buffers and parameters: its registry record's `init`
        record = getattr(module, "family", None) or getattr(module, "position_scheme", None)
        if record is not None and record.init is not None:
            record.init(module)
        elif hasattr(module, "init_parameters"):  # a family's submodule with tensors of its own (a feature map)
            module.init_parameters()
        elif isinstance(module, XArchRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, XArchMLMHead):
            init.zeros_(module.decoder.bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does, with `config.auto_map` naming every Auto class hf_xarch registers, so the folder
        loads with `trust_remote_code=True` for any head, in a Python that has no hf_xarch; write the native kernel's
        C source beside the Python files (transformers copies only those); then run `SAVE_HOOKS` (hf_xarch's
        model-card writer, which keeps a README.md that is already there)."""
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            save_kernel_source(save_directory)
            for hook in SAVE_HOOKS:
                hook(self, save_directory)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`; code loaded with `trust_remote_code=True` first fetches the native
        kernel's C source from the same folder or repository (transformers fetches only the Python files)."""
        fetch_kernel_source(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                    commit_description: str | None = None, **kwargs):
        """Like transformers' `push_to_hub`, but the README.md uploaded is the card `save_pretrained` wrote (ours)
        rather than transformers' generic one. Without a card writer registered, transformers' own behaviour."""
        if not SAVE_HOOKS:
            return super().push_to_hub(repo_id, commit_message=commit_message, private=private, token=token,
                                       revision=revision, create_pr=create_pr, max_shard_size=max_shard_size,
                                       tags=tags, commit_description=commit_description, **kwargs)
        import tempfile

        from transformers.utils.hub import hf_api

        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        card_kwargs = getattr(self, "_xarch_card_kwargs", None)
        if tags:  # the card writer reads these (hf_xarch.hub.set_card_info) and merges the tags into the metadata
            self._xarch_card_kwargs = {**(card_kwargs or {}), "tags": [*(card_kwargs or {}).get("tags", []), *tags]}
        try:
            with tempfile.TemporaryDirectory() as folder:
                self.save_pretrained(folder, max_shard_size=max_shard_size)
                return self._upload_modified_files(
                    folder,
                    repo_id,
                    files_timestamps={},
                    commit_message=commit_message or "Upload model",
                    token=token,
                    create_pr=create_pr,
                    revision=revision,
                    commit_description=commit_description,
                )
        finally:
            if tags:
                self._xarch_card_kwargs = card_kwargs


# Called as hook(model, folder) after every save_pretrained. `import hf_xarch` registers its model-card writer here; a
# model loaded with trust_remote_code (no hf_xarch) has none, and saves exactly as transformers does.
SAVE_HOOKS: list = []


def default_position_ids(
    length: int, attention_mask: torch.Tensor | None, past_length: int, device: torch.device, offset: int = 0
) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded sequence starts at position 0 exactly as it would
    unpadded (and cached decoding continues the count). Without a 2D mask: past_length, past_length+1, ...
    ``offset`` (``config.position_offset``) numbers real tokens from ``offset`` and puts padding at ``offset - 1``, as
    fairseq's make_positions (RoBERTa) does."""
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == past_length + length:
        real = attention_mask.long()
        positions = real.cumsum(-1) - 1
        positions = positions.clamp(min=0) if not offset else torch.where(real.bool(), positions + offset, offset - 1)
        return positions[:, past_length:]
    return torch.arange(offset + past_length, offset + past_length + length, device=device).unsqueeze(0)


def check_attention_mask(attention_mask: torch.Tensor, batch: int, length: int, past_length: int) -> None:
    """A padding mask covers every key: the cached ones and the new ones. A shorter one would be read as a different
    mask by each family (or fail deep inside sdpa), so every family gets it checked here."""
    keys = past_length + length
    if attention_mask.dim() == 2:
        ok, expected = tuple(attention_mask.shape) == (batch, keys), f"({batch}, {keys})"
    elif attention_mask.dim() == 4:  # a custom mask (batch or 1, heads or 1, queries, keys), full attention only
        shape = attention_mask.shape
        ok, expected = shape[0] in (1, batch) and shape[2] == length and shape[3] >= keys, f"({batch}, 1, {length}, {keys})"
    else:
        ok, expected = False, f"({batch}, {keys})"
    if not ok:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not fit the inputs: expected {expected}, a 2D "
            f"(batch, past + seq) padding mask over the {past_length} cached and {length} new tokens (or a 4D "
            "(batch, 1, seq, keys) mask for full attention)"
        )


class XArchModel(XArchPreTrainedModel):
    """The bare XArch stack: embeddings, blocks, final norm. Encoder when ``config.is_decoder`` is False; with
    ``config.is_encoder_decoder`` it builds ``XArchSeq2SeqModel`` (an encoder and a decoder stack)."""

    def __new__(cls, config=None, *args, **kwargs):
        # AutoModel maps one config class to one class: an encoder-decoder config gets its encoder-decoder base model
        built = cls
        if cls is XArchModel and getattr(config, "is_encoder_decoder", False):
            from .modeling_xarch_seq2seq import XArchSeq2SeqModel

            built = XArchSeq2SeqModel
        return super().__new__(built)

    def __init__(self, config: XArchConfig):
        config.check_all()  # fields changed since the config was built are checked before any layer reads them
        super().__init__(config)
        self.embeddings = XArchEmbeddings(config)
        scheme = POSITION_SCHEMES[config.position_embedding_type]
        # schemes that act inside attention (rotary, score bias) are computed once per forward and handed to blocks
        self.layer_positions = POSITION_MODULES[scheme.name](config) if scheme.kind in ("rotary", "bias") else None
        # `layers` holds the distinct blocks; `block_schedule[i]` is the block layer i applies (ALBERT's cross-layer
        # sharing, `num_hidden_groups`/`inner_group_num`). Each block is built for its first layer (its layer type).
        self.block_schedule = config.block_schedule()
        first_layer: dict[int, int] = {}
        for index, block in enumerate(self.block_schedule):
            first_layer.setdefault(block, index)
        self.layers = nn.ModuleList([XArchBlock(config, first_layer[block]) for block in sorted(first_layer)])
        # what a family shares across its layers (Linformer's layerwise projection), by family name: owned here once,
        # as T5's bias table is (saved once, in FSDP's root unit), and lent to each of the family's layers
        self.shared_attention = nn.ModuleDict()
        for block in self.layers:
            family = type(block.attention)
            name = family.family.name
            build_shared = getattr(family, "build_shared", None)
            if name not in self.shared_attention and build_shared and (shared := build_shared(config)) is not None:
                self.shared_attention[name] = shared
            if name in self.shared_attention:
                block.attention.lend_shared(self.shared_attention[name])
        self.norm = make_norm(config) if config.final_norm else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        global_attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, seq)`): token ids; or give `inputs_embeds` instead.
        attention_mask (`torch.Tensor` of shape `(batch, past + seq)`): 1 for real tokens, 0 for padding.
        position_ids (`torch.LongTensor`, *optional*): defaults to positions that skip left padding.
        cache (`Cache`, *optional*): transformers cache for decoding (decoders only); `past_key_values` is accepted
            under its deprecated name.
        token_type_ids (`torch.LongTensor`, *optional*): segment ids when `config.type_vocab_size > 0`.
        global_attention_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*): 1 marks a global token, which
            attends to every token and which every token attends to (Longformer's argument); only for layers whose
            family declares `global_tokens` (sliding_window encoders).
        encoder_hidden_states (`torch.Tensor` of shape `(batch, source, hidden)`): the encoder output a decoder with
            cross-attention (`config.add_cross_attention`, an encoder-decoder's decoder) attends to; its cache is then
            an `EncoderDecoderCache`.
        encoder_attention_mask (`torch.Tensor` of shape `(batch, source)`, *optional*): 1 for real encoder tokens.
        """
        if global_attention_mask is not None and not any(f.global_tokens for f in self.config.layer_families()):
            raise ValueError(
                f"global_attention_mask: no layer of this model takes global tokens (layer_types="
                f"{self.config.layer_types}); use attention_type='sliding_window'"
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("XArchModel.forward: give exactly one of input_ids or inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        if reference.dim() < 2 or 0 in reference.shape[:2]:
            raise ValueError(
                f"{name} of shape {tuple(reference.shape)}: expected (batch, seq) with at least one row and one token"
            )
        if not self.config.is_decoder:
            if cache is not None:
                raise ValueError("cache: an encoder (is_decoder=False) sees the whole sequence at once and has no cache")
            use_cache = False
        cross = self.cross_attention_inputs(encoder_hidden_states, encoder_attention_mask, reference)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
            if cross:  # the cross-attention half starts empty: its layers are made at the first step
                cache = EncoderDecoderCache(cache, DynamicCache())
        returned_cache = cache
        if cross and cache is not None:
            if not isinstance(cache, EncoderDecoderCache):
                raise ValueError(f"cache: a decoder with cross-attention takes an EncoderDecoderCache, got {type(cache).__name__}")
            cross["cross_cache"], cache = cache, cache.self_attention_cache

        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            check_attention_mask(attention_mask, *reference.shape[:2], past_length)
        if position_ids is None:
            position_ids = default_position_ids(
                reference.shape[1], attention_mask, past_length, reference.device, self.config.position_offset
            )
        hidden_states = self.embeddings(input_ids, inputs_embeds, position_ids, token_type_ids)
        if cross:
            cross["encoder_attention_mask"] = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )

        # one mask per attention family present (as Gemma/Mistral build one per layer type), each built by the family
        masks = {}
        for layer in self.layers:
            family = type(layer.attention)
            if family not in masks:
                wants_global = global_attention_mask is not None and family.family.global_tokens
                extra = {"global_attention_mask": global_attention_mask} if wants_global else {}
                masks[family] = family.build_mask(
                    self.config, hidden_states, attention_mask, cache, position_ids, **extra
                )

        # a rotary scheme gives (cos, sin), passed as position_embeddings; a bias scheme an additive score-bias object,
        # passed as score_bias (it also needs the positions of the cached keys, which only the model can recount)
        position_embeddings, positions_kwargs = None, {}
        if self.layer_positions is not None:
            if POSITION_SCHEMES[self.config.position_embedding_type].kind == "bias":
                positions_kwargs["score_bias"] = self.layer_positions(
                    hidden_states, position_ids, attention_mask=attention_mask, past_length=past_length
                )
            else:
                position_embeddings = self.layer_positions(hidden_states, position_ids)
        for layer_idx, block in enumerate(self.block_schedule):
            layer = self.layers[block]
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[type(layer.attention)],
                position_embeddings=position_embeddings,
                cache=cache,
                position_ids=position_ids,
                layer_idx=layer_idx,  # a shared block runs at several depths, each with its own cache layer
                **positions_kwargs,
                **cross,
                **kwargs,
            )
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, cache=returned_cache if use_cache else None
        )

    def cross_attention_inputs(self, encoder_hidden_states, encoder_attention_mask, reference) -> dict:
        """The blocks' cross-attention arguments ({} without cross-attention); checks they fit the model."""
        if not self.config.add_cross_attention:
            if encoder_hidden_states is not None or encoder_attention_mask is not None:
                raise ValueError("encoder_hidden_states: this model has no cross-attention (an encoder-decoder's "
                                 "decoder has: is_encoder_decoder=True)")
            return {}
        if encoder_hidden_states is None:
            raise ValueError("encoder_hidden_states: a decoder with cross-attention (add_cross_attention=True) needs "
                             "the encoder output it attends to")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != reference.shape[0]:
            raise ValueError(f"encoder_hidden_states of shape {tuple(encoder_hidden_states.shape)}: expected "
                             f"(batch={reference.shape[0]}, source, hidden)")
        batch, source = encoder_hidden_states.shape[:2]
        if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != (batch, source):
            raise ValueError(f"encoder_attention_mask of shape {tuple(encoder_attention_mask.shape)}: expected "
                             f"({batch}, {source}), the encoder's padding mask")
        return {"encoder_hidden_states": encoder_hidden_states}


class XArchForCausalLM(QuantizedCacheGeneration, XArchPreTrainedModel, GenerationMixin):
    """Causal LM head (always a decoder). With factorized embeddings the hidden state is projected to
    `embedding_size` before the (tied) output layer.

    With `output_layer="adaptive"` the output layer is an adaptive softmax (`AdaptiveSoftmaxHead`) and `logits` are
    log-probabilities: softmax, argmax, temperature and top-k/top-p act on them exactly as on logits, so `generate()`
    and perplexity work unchanged. A training step with `labels` returns `logits=None`: the loss scores each token in
    its own cluster only, and skipping the V-wide output is the point of adaptive softmax. In eval mode, or without
    labels, `logits` hold the full distribution.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}
    quantized_cache_class = XArchQuantizedCache  # generate(cache_implementation="quantized"), backend "xarch"

    @staticmethod
    def create_masks_for_generate(config, inputs_embeds, attention_mask, cache=None, position_ids=None, **kwargs):
        """`generate()` calls this to prebuild 4-d masks per layer type when the cache is compileable (a static cache
        of full-attention layers). XArch's attention families build their own masks from the 2-d padding mask in every
        forward (the full layers through transformers' masking utilities, which size them to the static cache), so
        the 2-d mask is passed through unchanged."""
        return attention_mask

    def __init__(self, config: XArchConfig):
        if not config.is_decoder:
            logger.info("XArchForCausalLM: setting config.is_decoder=True (a causal LM is always a decoder)")
            config.is_decoder = True  # classifier_pooling follows while it holds its default (XArchConfig.__setattr__)
        super().__init__(config)
        self.model = XArchModel(config)
        self.lm_head_projection = (
            nn.Linear(config.hidden_size, config.embedding_size, bias=False)
            if config.embedding_size != config.hidden_size
            else None
        )
        if config.output_layer == "adaptive":
            self.lm_head = AdaptiveSoftmaxHead(config)
        else:
            self.lm_head = nn.Linear(config.embedding_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear | None:
        # None for the adaptive softmax: it is no V x E matrix, so transformers must neither tie nor resize it
        return None if isinstance(self.lm_head, AdaptiveSoftmaxHead) else self.lm_head

    def resize_token_embeddings(self, *args, **kwargs):
        if isinstance(self.lm_head, AdaptiveSoftmaxHead):
            raise ValueError(
                "resize_token_embeddings: output_layer='adaptive' has fixed clusters (adaptive_cutoffs); resizing is "
                "supported with output_layer='full' only"
            )
        return super().resize_token_embeddings(*args, **kwargs)

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""labels (`torch.LongTensor` of shape `(batch, seq)`): next-token targets (shifted inside; -100 ignored)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        if isinstance(self.lm_head, AdaptiveSoftmaxHead):
            loss, logits = self.adaptive_softmax_output(hidden_states, keep, labels, **kwargs)
            return CausalLMOutputWithPast(
                loss=loss,
                logits=logits,
                cache=outputs.cache,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )
        hidden_states = hidden_states[:, keep, :]
        if self.lm_head_projection is not None:
            hidden_states = self.lm_head_projection(hidden_states)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def adaptive_softmax_output(self, hidden_states, keep, labels, **kwargs):
        """(loss, log-probabilities) of the adaptive softmax; see the class docstring for when logits are None."""
        project = self.lm_head_projection if self.lm_head_projection is not None else nn.Identity()
        loss = None
        if labels is not None:
            loss = self.lm_head.causal_lm_loss(project(hidden_states), labels, **kwargs)
        if labels is not None and self.training:
            return loss, None
        return loss, self.lm_head.log_probs(project(hidden_states[:, keep, :]))


class XArchMLMHead(nn.Module):
    """BERT/ALBERT's MLM head: dense (hidden -> embedding_size), activation, norm, then the (tied) decoder."""

    def __init__(self, config: XArchConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.norm = make_norm(config, config.embedding_size)
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act_fn(self.dense(hidden_states))))


class XArchForMaskedLM(XArchPreTrainedModel):
    _tied_weights_keys = {"lm_head.decoder.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: XArchConfig):
        if config.is_decoder:
            raise ValueError(
                "XArchForMaskedLM needs is_decoder=False: a masked token must see the context on both sides "
                "(use XArchForCausalLM for a decoder)"
            )
        super().__init__(config)
        self.model = XArchModel(config)
        self.lm_head = XArchMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        r"""labels (`torch.LongTensor` of shape `(batch, seq)`): targets at masked positions, -100 elsewhere."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            global_attention_mask=global_attention_mask,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class XArchPooler(nn.Module):
    """BERT's pooler: tanh(W h) on the pooled token."""

    def __init__(self, config: XArchConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(pooled))


def pool_sequence(
    hidden_states: torch.Tensor,
    how: str,
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    pad_token_id: int | None,
) -> torch.Tensor:
    """One vector per sequence: the first token, the last real token (either padding side) or the masked mean."""
    batch = hidden_states.shape[0]
    if how == "first":
        return hidden_states[:, 0]
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask[:, -hidden_states.shape[1] :].to(hidden_states.device, torch.long)
    elif input_ids is not None and pad_token_id is not None:
        real = (input_ids != pad_token_id).to(hidden_states.device, torch.long)
    else:
        if batch > 1 and how == "last":
            logger.warning_once("classifier_pooling='last' without attention_mask or pad_token_id: using the last token")
        real = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
    if how == "mean":
        weights = real.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)
    positions = torch.arange(real.shape[1], device=real.device)
    last = (positions * real).argmax(-1)  # rightmost real token, for left and right padding alike
    return hidden_states[torch.arange(batch, device=hidden_states.device), last]


# Not transformers' GenericForSequenceClassification: that one scores only the last non-pad token with a bias-free
# `score`; ours pools `first` (BERT's tanh pooler), `last` or `mean`, with dropout and BERT's biased `classifier`.
class XArchForSequenceClassification(XArchPreTrainedModel):
    def __init__(self, config: XArchConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = XArchModel(config)
        self.pooler = XArchPooler(config) if config.classifier_pooling == "first" else None
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        r"""labels: class ids (single-label), floats (regression when num_labels == 1) or multi-hot floats."""
        kwargs.pop("use_cache", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            global_attention_mask=global_attention_mask,
            use_cache=False,
            **kwargs,
        )
        pooled = pool_sequence(
            outputs.last_hidden_state, self.config.classifier_pooling, attention_mask, input_ids, self.config.pad_token_id
        )
        if self.pooler is not None:
            pooled = self.pooler(pooled)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# Not GenericForTokenClassification: it names the layer `score` (saved models and the BERT conversions use
# `classifier`), and its forward has no token_type_ids / global_attention_mask (see XArchForQuestionAnswering).
class XArchForTokenClassification(XArchPreTrainedModel):
    def __init__(self, config: XArchConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = XArchModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        r"""labels (`torch.LongTensor` of shape `(batch, seq)`): a class per token, -100 to ignore."""
        kwargs.pop("use_cache", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            global_attention_mask=global_attention_mask,
            use_cache=False,
            **kwargs,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# Not GenericForQuestionAnswering: its forward has no token_type_ids / global_attention_mask parameters, so Trainer
# (remove_unused_columns) would drop those dataset columns; and it builds the stack with AutoModel.from_config, which
# a trust_remote_code load without hf_xarch cannot resolve (only the loaded head is registered there).
class XArchForQuestionAnswering(XArchPreTrainedModel):
    def __init__(self, config: XArchConfig):
        super().__init__(config)
        self.model = XArchModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        r"""start_positions / end_positions (`torch.LongTensor` of shape `(batch,)`): the answer span."""
        kwargs.pop("use_cache", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            global_attention_mask=global_attention_mask,
            use_cache=False,
            **kwargs,
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class Head(NamedTuple):
    model_class: type
    auto_class: str  # the transformers Auto class that loads it
    pipeline_tag: str  # its task, as the Hub's pipeline tags name it


# Every model class hf_xarch registers, written once. Derived from it: each class's `_auto_class` and `AUTO_MAP` (so
# `save_pretrained` copies these files and names every head in config.auto_map), the Auto registration in
# hf_xarch/__init__.py, the model card's Auto class and pipeline tag (hf_xarch/hub.py) and `__all__`.
HEADS = (
    Head(XArchModel, "AutoModel", "feature-extraction"),
    Head(XArchForCausalLM, "AutoModelForCausalLM", "text-generation"),
    Head(XArchForMaskedLM, "AutoModelForMaskedLM", "fill-mask"),
    Head(XArchForSequenceClassification, "AutoModelForSequenceClassification", "text-classification"),
    Head(XArchForTokenClassification, "AutoModelForTokenClassification", "token-classification"),
    Head(XArchForQuestionAnswering, "AutoModelForQuestionAnswering", "question-answering"),
)
for _head in HEADS:
    _head.model_class.register_for_auto_class(_head.auto_class)
del _head


def _class_ref(cls: type) -> str:
    """"module.Class" as config.auto_map names a class in a saved folder (the file name without the package)."""
    return f"{cls.__module__.rpartition('.')[2]}.{cls.__name__}"


# Auto class -> "module.Class" for config.auto_map: every head, whichever one is saved (the README's "Sharing models").
# The encoder-decoder head lives in modeling_xarch_seq2seq.py (which imports this file; see its SEQ2SEQ_HEADS).
AUTO_MAP = {
    "AutoConfig": _class_ref(XArchConfig),
    **{head.auto_class: _class_ref(head.model_class) for head in HEADS},
    "AutoModelForSeq2SeqLM": "modeling_xarch_seq2seq.XArchForConditionalGeneration",
}

__all__ = ["XArchPreTrainedModel", "Head", "HEADS", "AUTO_MAP"]
__all__ += [head.model_class.__name__ for head in HEADS]
