"""What an XArch config costs: parameters by part, FLOPs per token, KV-cache bytes per token.

    >>> import hf_xarch
    >>> print(hf_xarch.summary(hf_xarch.XArchConfig(), seq_len=2048))
    $ hf-xarch summary path/to/saved_model --seq-len 4096

Conventions (so numbers compare across configs and with papers):

- Parameters are counted from the config; shared blocks (``num_hidden_groups``) count once and a tied output layer
  counts nothing beyond the input embedding, as ``model.num_parameters()`` does. Attention and position modules are
  whatever their family registers, so they are counted by building one of each on the meta device (no memory).
- FLOPs count matrix multiplications only (one multiply-add = 2 FLOPs): every ``nn.Linear`` a token passes through,
  plus the attention core (scores and mixing), which each attention family describes with a cost function
  (its registry record's ``cost``, returning a ``registry.AttentionCost``). Norms, activations, softmax and embedding lookups are left out (a few percent).
  Only useful work is counted: a causal query at position i scores i keys, so a sequence of N averages (N+1)/2.
- Training FLOPs per token = 3 x forward (the backward pass costs about twice the forward; Kaplan et al. 2020), at
  every position of a training sequence of ``seq_len``. Inference FLOPs per token: for a decoder, one new token
  decoded after ``seq_len - 1`` cached ones (the head runs once); for an encoder, the forward of a ``seq_len`` input.
- KV-cache bytes per token: what all layers cache after ``seq_len`` tokens, divided by ``seq_len`` (constant for full
  attention, falling with length for bounded caches); 0 for encoders, which keep no cache. The same figure for
  ``generate(cache_implementation="quantized")`` at 8, 4 and 2 bits (``quantized_kv_cache_bytes_per_token``): codes,
  scales and minimums plus the full-precision residual of ``hf_xarch.model.cache_quantized``; fixed states
  (Performer) stay unquantized.
- The adaptive-softmax head is costed as its full log-probabilities (every cluster for every token), an upper bound
  of the training loss's cost, which evaluates each token's own cluster only.

Encoder-decoders (``is_encoder_decoder=True``; ``seq_len`` is the source length, ``target_len`` the target's): each
stack is costed as above (``stack_config``), the shared token table counts once, and every decoder layer adds its
cross-attention: q and o projections per target token, k and v per source token, and full attention of each target
token over the source. FLOPs per token spread one example's FLOPs over its source + target tokens; inference is one
target token decoded (the encoder ran once before); ``kv_cache_bytes_per_token`` is the decoder's self-attention cache
per target token, and ``cross_attention_cache_bytes`` the source's keys and values, cached once per sequence.

A family without a cost function is not guessed at: its attention-core FLOPs and cache bytes are reported as unknown
(``None``), the totals that would include them too, and ``unknown_families`` names it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hf_xarch.model.cache_quantized import (
    DEFAULT_RESIDUAL_LENGTH,
    QUANTIZED_BITS,
    quantized_cache_bytes,
    quantized_cache_settings,
)
from hf_xarch.model.configuration_xarch import XArchConfig
from hf_xarch.model.families import ATTENTION_FAMILIES, ATTENTION_MODULES, POSITION_MODULES, POSITION_SCHEMES
from hf_xarch.model.registry import AttentionCost

HEADS = ("causal_lm", "masked_lm", "base")
SEQ2SEQ_HEADS = ("seq2seq_lm", "base")  # XArchForConditionalGeneration, XArchSeq2SeqModel
PARTS = ("embeddings", "attention", "mlp", "norms", "head")


@dataclass
class ModelSummary:
    """The result of ``summary``; ``str()`` renders it as a table, ``to_dict()`` as JSON-ready data."""

    head: str
    seq_len: int
    bytes_per_value: int
    num_layers: int
    num_distinct_blocks: int
    tied_output: bool
    parameters: dict[str, int]
    forward_flops: dict[str, float | None]  # per token, by part
    training_flops_per_token: float | None
    inference_flops_per_token: float | None
    kv_cache_bytes_per_token: float | None
    unknown_families: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # the same with generate(cache_implementation="quantized") at 8/4/2 bits (residual 128, default groups): setting ->
    # bytes per token; empty for encoders, None where a family's cost is unknown
    quantized_kv_cache_bytes_per_token: dict[str, float] | None = field(default_factory=dict)
    # encoder-decoders only: the target length (seq_len is the source's), and the cross-attention keys and values
    # of the source that every decoder layer caches once per sequence, in bytes
    target_len: int | None = None
    cross_attention_cache_bytes: float | None = None

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total_parameters": self.total_parameters}

    def __str__(self) -> str:
        lines = [
            (
                f"XArch summary: head={self.head}, seq_len={self.seq_len}"
                f"{'' if self.target_len is None else f', target_len={self.target_len}'}, {self.num_layers} layers "
                f"({self.num_distinct_blocks} distinct blocks), output layer tied={self.tied_output}"
            ),
            "",
            f"{'part':<12}{'parameters':>16}{'share':>9}{'fwd FLOPs/token':>20}",
        ]
        total = self.total_parameters or 1
        for part in PARTS:
            lines.append(
                f"{part:<12}{self.parameters[part]:>16,}{self.parameters[part] / total:>9.1%}"
                f"{_fmt(self.forward_flops[part]):>20}"
            )
        lines.append(f"{'total':<12}{self.total_parameters:>16,}{'':>9}{_fmt(_sum(self.forward_flops.values())):>20}")
        lines += [
            "",
            f"training FLOPs per token (3 x forward):   {_fmt(self.training_flops_per_token)}",
            f"inference FLOPs per token:                {_fmt(self.inference_flops_per_token)}",
            f"KV-cache bytes per token ({self.bytes_per_value} B/value): {_fmt(self.kv_cache_bytes_per_token)}",
        ]
        if self.cross_attention_cache_bytes is not None:
            lines.append(f"cross-attention cache bytes per sequence:  {_fmt(self.cross_attention_cache_bytes)}")
        for setting, value in (self.quantized_kv_cache_bytes_per_token or {}).items():
            lines.append(f"  quantized cache, {setting + ':':<29} {_fmt(value)}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "unknown"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {unit}"
    return f"{value:.1f}"


def _sum(values) -> float | None:
    values = list(values)
    return None if any(value is None for value in values) else float(sum(values))


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _linear_weights(module: nn.Module) -> int:
    """Weights of the Linear layers in ``module``: a token passing through all of them costs twice this in FLOPs."""
    return sum(sub.weight.numel() for sub in module.modules() if isinstance(sub, nn.Linear))


def _build(module_class: Callable[..., nn.Module], *args) -> nn.Module:
    """Build a module without allocating its weights (meta device); modules that compute something at build time
    that the meta device cannot (a QR for random features) are built on the CPU instead."""
    try:
        with torch.device("meta"):
            return module_class(*args)
    except (NotImplementedError, RuntimeError):
        return module_class(*args)


def _norm_params(config: XArchConfig, dim: int) -> int:
    return dim if config.norm_type == "rmsnorm" else 2 * dim  # LayerNorm has a bias, RMSNorm does not


def _bytes_per_value(config: XArchConfig, dtype: str | torch.dtype | None) -> int:
    dtype = dtype if dtype is not None else getattr(config, "dtype", None)
    if dtype is None:
        return 4  # models build in float32 unless told otherwise
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16', 'float16')")
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def summary(
    config: XArchConfig,
    seq_len: int = 2048,
    head: str | None = None,
    dtype: str | torch.dtype | None = None,
    target_len: int | None = None,
) -> ModelSummary:
    """Parameters by part, FLOPs per token and KV-cache bytes per token of ``config`` (see the module docstring).

    seq_len: the sequence length; for an encoder-decoder, the source (encoder input) length.
    head: ``causal_lm`` (XArchForCausalLM), ``masked_lm`` (XArchForMaskedLM) or ``base`` (XArchModel, no head);
        defaults to ``causal_lm`` for decoders and ``masked_lm`` for encoders. An encoder-decoder takes
        ``seq2seq_lm`` (XArchForConditionalGeneration, the default) or ``base`` (XArchSeq2SeqModel).
    dtype: the type of cached keys/values; defaults to ``config.dtype``, else float32.
    target_len: encoder-decoders only: the target (decoder) length; defaults to ``seq_len``.
    """
    if not isinstance(config, XArchConfig):
        raise ValueError(f"summary: config must be an XArchConfig, got {type(config).__name__}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"summary: seq_len={seq_len!r} is not allowed: a positive integer")
    if target_len is not None and (isinstance(target_len, bool) or not isinstance(target_len, int) or target_len <= 0):
        raise ValueError(f"summary: target_len={target_len!r} is not allowed: a positive integer, or None")
    if config.is_encoder_decoder:
        return _encoder_decoder_summary(config, seq_len, target_len or seq_len, head or "seq2seq_lm", dtype)
    if target_len is not None:
        raise ValueError(f"summary: target_len={target_len} is for encoder-decoders (is_encoder_decoder=True); a "
                         "single stack has one length, seq_len")
    head = head or ("causal_lm" if config.is_decoder else "masked_lm")
    if head not in HEADS:
        raise ValueError(f"summary: head={head!r} is not allowed: one of {list(HEADS)}"
                         + (" ('seq2seq_lm' needs is_encoder_decoder=True)" if head == "seq2seq_lm" else ""))
    if head == "masked_lm" and config.is_decoder:
        raise ValueError("summary: head='masked_lm' needs an encoder (is_decoder=False), as XArchForMaskedLM does")
    if head == "causal_lm" and not config.is_decoder:
        config = copy.deepcopy(config)
        config.is_decoder = True  # XArchForCausalLM makes every config a decoder
    bytes_per_value = _bytes_per_value(config, dtype)
    hidden, emb, vocab = config.hidden_size, config.embedding_size, config.vocab_size
    schedule = config.block_schedule()
    first_layer = {}
    for layer, block in enumerate(schedule):
        first_layer.setdefault(block, layer)
    families = config.layer_families()
    notes = []

    # ---- parameters ------------------------------------------------------------------------------------------
    params = dict.fromkeys(PARTS, 0)
    params["embeddings"] = vocab * emb + config.type_vocab_size * emb
    scheme = POSITION_SCHEMES[config.position_embedding_type]
    position_module = POSITION_MODULES[scheme.name]
    if position_module is not None:
        params["embeddings"] += _count(_build(position_module, config))
    if emb != hidden:
        params["embeddings"] += emb * hidden + hidden  # the E -> H projection
    if config.embedding_norm:
        params["norms"] += _norm_params(config, emb)
    if config.final_norm:
        params["norms"] += _norm_params(config, hidden)

    inner = config.intermediate_size
    mlp_weights = (3 if config.mlp_type == "gated" else 2) * hidden * inner
    mlp_biases = ((2 if config.mlp_type == "gated" else 1) * inner + hidden) if config.mlp_bias else 0
    attention_weights = {}  # distinct block -> Linear weights a token passes through
    for block, layer in first_layer.items():
        module = _build(ATTENTION_MODULES[families[layer].name], config, layer)
        params["attention"] += _count(module)
        attention_weights[block] = _linear_weights(module)
        params["mlp"] += mlp_weights + mlp_biases
        params["norms"] += 2 * _norm_params(config, hidden)
    # what a family shares across its layers (Linformer's layerwise projection): one module the model owns, counted once
    for family in {families[layer].name for layer in first_layer.values()}:
        build_shared = getattr(ATTENTION_MODULES[family], "build_shared", None)
        shared = _build(build_shared, config) if build_shared is not None else None
        params["attention"] += _count(shared) if shared is not None else 0

    head_flops = 0.0
    tied = False
    if head == "causal_lm":
        if emb != hidden:
            params["head"] += hidden * emb  # lm_head_projection (no bias)
            head_flops += 2 * hidden * emb
        if config.output_layer == "adaptive":
            from hf_xarch.model.adaptive_softmax import AdaptiveSoftmaxHead

            adaptive = _build(AdaptiveSoftmaxHead, config)
            params["head"] += _count(adaptive)
            head_flops += 2 * _linear_weights(adaptive)
            notes.append("adaptive softmax head costed as full log-probabilities (an upper bound for training)")
        else:
            tied = bool(config.tie_word_embeddings)
            params["head"] += 0 if tied else vocab * emb
            head_flops += 2 * emb * vocab
    elif head == "masked_lm":
        tied = bool(config.tie_word_embeddings)
        params["head"] += hidden * emb + emb + _norm_params(config, emb) + vocab  # dense, norm, decoder bias
        params["head"] += 0 if tied else vocab * emb
        head_flops += 2 * (hidden * emb + emb * vocab)

    # ---- FLOPs and cache ---------------------------------------------------------------------------------------
    forward = dict.fromkeys(PARTS, 0.0)
    forward["embeddings"] = 2 * emb * hidden if emb != hidden else 0.0
    forward["head"] = head_flops
    forward["mlp"] = len(schedule) * 2 * mlp_weights
    projections = 0.0  # the attention projections of every layer, per token
    core = 0.0  # scores and mixing, per token of a training sequence
    decode_core: float | None = 0.0  # the same for one decoded token
    cache_values: float | None = 0.0
    # generate(cache_implementation="quantized"): keys and values of "dynamic"/"sliding_window" caches quantized, a
    # fixed state ("recurrent": Performer) kept as it is
    quantized_settings = []
    for nbits in sorted(QUANTIZED_BITS, reverse=True):
        try:
            quantized_settings.append(quantized_cache_settings(config.head_dim, nbits))
        except ValueError as error:  # e.g. 2 bits pack 4 codes a byte: head_dim must be a multiple of 4
            notes.append(f"quantized cache: {error}")
    quantized_cache = [0.0] * len(quantized_settings)
    unknown = []
    for layer, block in enumerate(schedule):
        family = families[layer].name
        cost_fn = ATTENTION_FAMILIES[family].cost
        if cost_fn is None:
            projections += 2 * attention_weights[block]
            if family not in unknown:
                unknown.append(family)
            continue
        cost = cost_fn(config, layer, seq_len)
        projections += 2 * attention_weights[block] if cost.projection_flops is None else cost.projection_flops
        core += cost.forward_flops
        decode_core += cost.decode_flops
        cache_values += cost.cache_values
        width = 2 * config.num_key_value_heads * config.head_dim
        for index, settings in enumerate(quantized_settings):
            if ATTENTION_FAMILIES[family].cache_layer in ("dynamic", "sliding_window"):
                tokens = round(cost.cache_values / width)
                quantized_cache[index] += quantized_cache_bytes(
                    tokens, config.num_key_value_heads, config.head_dim, bytes_per_value, **settings
                )
            else:
                quantized_cache[index] += cost.cache_values * bytes_per_value
        if cost.note and cost.note not in notes:
            notes.append(cost.note)
    forward["attention"] = projections + core
    if unknown:
        forward["attention"] = decode_core = cache_values = None
        notes.append(
            f"no cost function for attention famil{'y' if len(unknown) == 1 else 'ies'} {unknown}: attention-core "
            "FLOPs and cache bytes unknown (give the family's registry record a `cost`)"
        )
    if len(first_layer) < len(schedule):
        notes.append(f"{len(schedule)} layers apply {len(first_layer)} shared blocks: parameters count each once")

    total_forward = _sum(forward.values())
    training = None if total_forward is None else 3 * total_forward
    if head == "causal_lm" or (config.is_decoder and head == "base"):
        if decode_core is None:
            inference = None
        else:
            inference = forward["embeddings"] + projections + decode_core + forward["mlp"] + head_flops
        kv_bytes = None if cache_values is None else cache_values * bytes_per_value / seq_len
        quantized_kv = None if cache_values is None else {
            f"{settings['nbits']}-bit, group {settings['q_group_size']}, residual {DEFAULT_RESIDUAL_LENGTH}":
            value / seq_len
            for settings, value in zip(quantized_settings, quantized_cache)
        }
    else:
        inference = total_forward
        kv_bytes = 0.0
        quantized_kv = {}
    return ModelSummary(
        head=head,
        seq_len=seq_len,
        bytes_per_value=bytes_per_value,
        num_layers=len(schedule),
        num_distinct_blocks=len(first_layer),
        tied_output=tied,
        parameters=params,
        forward_flops=forward,
        training_flops_per_token=training,
        inference_flops_per_token=inference,
        kv_cache_bytes_per_token=kv_bytes,
        unknown_families=unknown,
        notes=notes,
        quantized_kv_cache_bytes_per_token=quantized_kv,
    )


def _encoder_decoder_summary(
    config: XArchConfig, source_len: int, target_len: int, head: str, dtype: str | torch.dtype | None
) -> ModelSummary:
    """``summary`` of an encoder-decoder: each stack summarized as the single stack it is (``stack_config``), plus
    what only the pair has: the cross-attention of every decoder layer, and one shared token table (see the module
    docstring for the per-token conventions)."""
    if head not in SEQ2SEQ_HEADS:
        raise ValueError(f"summary: head={head!r} is not allowed for an encoder-decoder: one of {list(SEQ2SEQ_HEADS)}")
    from hf_xarch.model.attention_cross import XArchCrossAttention

    bytes_per_value = _bytes_per_value(config, dtype)
    decoder_config = config.stack_config("decoder")
    encoder = summary(config.stack_config("encoder"), seq_len=source_len, head="base", dtype=dtype)
    decoder = summary(decoder_config, seq_len=target_len, head="causal_lm" if head == "seq2seq_lm" else "base",
                      dtype=dtype)
    params = {part: encoder.parameters[part] + decoder.parameters[part] for part in PARTS}
    # the decoder's token table (and E -> H projection) is the encoder's
    hidden, emb = config.hidden_size, config.embedding_size
    params["embeddings"] -= config.vocab_size * emb + (emb * hidden + hidden if emb != hidden else 0)

    schedule = decoder_config.block_schedule()
    for block in sorted(set(schedule)):
        cross = _build(XArchCrossAttention, decoder_config, block)
        params["attention"] += _count(cross)
        params["norms"] += _norm_params(config, hidden)  # cross_attention_norm
    # projection FLOPs of a cross-attention layer: q and o per target token, k and v per source token
    per_target = 2 * (cross.q_proj.weight.numel() + cross.o_proj.weight.numel())
    per_source = 2 * (cross.k_proj.weight.numel() + cross.v_proj.weight.numel())
    per_key = 4 * config.num_attention_heads * config.head_dim  # scores and mixing of one query with one key
    layers = len(schedule)

    # FLOPs of one example (source and target), spread over its source_len + target_len tokens
    tokens = source_len + target_len
    forward = {}
    for part in PARTS:
        values = (encoder.forward_flops[part], decoder.forward_flops[part])
        forward[part] = None if None in values else (values[0] * source_len + values[1] * target_len) / tokens
    if forward["attention"] is not None:
        cross_flops = layers * (target_len * per_target + source_len * per_source + target_len * source_len * per_key)
        forward["attention"] += cross_flops / tokens
    total_forward = _sum(forward.values())
    # a decoded token: the decoder's own step, and its cross-attention over the source (keys and values cached)
    inference = decoder.inference_flops_per_token
    if inference is not None:
        inference += layers * (per_target + source_len * per_key)
    notes = list(dict.fromkeys(encoder.notes + decoder.notes))
    notes.append(f"encoder-decoder: FLOPs per token of a {source_len}-token source with a {target_len}-token target "
                 "(both count as tokens); inference = one target token decoded; KV-cache = the decoder's self-attention "
                 "per target token, and the cross-attention keys/values of the source once per sequence")
    return ModelSummary(
        head=head,
        seq_len=source_len,
        target_len=target_len,
        bytes_per_value=bytes_per_value,
        num_layers=encoder.num_layers + decoder.num_layers,
        num_distinct_blocks=encoder.num_distinct_blocks + decoder.num_distinct_blocks,
        tied_output=decoder.tied_output,
        parameters=params,
        forward_flops=forward,
        training_flops_per_token=None if total_forward is None else 3 * total_forward,
        inference_flops_per_token=inference,
        kv_cache_bytes_per_token=decoder.kv_cache_bytes_per_token,
        cross_attention_cache_bytes=layers * 2 * config.num_key_value_heads * config.head_dim * source_len
        * bytes_per_value,
        unknown_families=list(dict.fromkeys(encoder.unknown_families + decoder.unknown_families)),
        notes=notes,
        quantized_kv_cache_bytes_per_token={},
    )


def load_config(path: str) -> XArchConfig:
    """An XArchConfig from a saved model folder (its config.json) or a config JSON file."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} is neither a folder with a config.json nor a config file")
    with open(file, encoding="utf-8") as handle:
        data = json.load(handle)
    model_type = data.get("model_type", "xarch")
    if model_type != "xarch":
        raise ValueError(f"{file}: model_type={model_type!r}; summary reads XArch configs (model_type 'xarch')")
    return XArchConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-xarch summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a saved model folder or a config.json")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length of the FLOP and cache figures")
    parser.add_argument("--head", choices=HEADS + SEQ2SEQ_HEADS[:1], default=None,
                        help="default: causal_lm for decoders, seq2seq_lm for encoder-decoders, else masked_lm")
    parser.add_argument("--target-len", type=int, default=None,
                        help="encoder-decoders: target length (default: --seq-len, then the source length)")
    parser.add_argument("--dtype", default=None, help="type of cached keys/values (default: the config's, else float32)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    result = summary(load_config(args.config), seq_len=args.seq_len, head=args.head, dtype=args.dtype,
                     target_len=args.target_len)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


__all__ = [
    "summary",
    "ModelSummary",
    "AttentionCost",
    "load_config",
    "main",
]

if __name__ == "__main__":
    from hf_xarch.cli import main as cli_main

    sys.exit(cli_main(["summary", *sys.argv[1:]]))
