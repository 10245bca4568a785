"""The sliding-window family's record and config helpers: what ``XArchConfig`` reads of it (window, dilation, sinks,
global projections, the derived ``sliding_window``), with no torch import. The layer, its masks and its kernels are in
``attention_sliding.py`` and ``attention_sliding_kernels.py``."""

from __future__ import annotations

from .registry import AttentionCost, AttentionFamily, config_error, register_family

DEFAULT_ATTENTION_WINDOW = 512  # Longformer's default


# ---- configuration -------------------------------------------------------------------------------------------------
def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _fail(name: str, value, allowed: str):
    raise config_error(name, value, allowed)


def _per_layer(value, layer: int):
    return value[layer] if isinstance(value, (list, tuple)) else value


def _head_dilations(dilation, layer: int, heads: int) -> list[int]:
    entry = _per_layer(dilation if dilation is not None else 1, layer)
    return list(entry) if isinstance(entry, (list, tuple)) else [entry] * heads


def window_span(window: int, dilations: list[int]) -> int:
    """Key slots a causal query reaches: itself and (w-1)·d before it (the cache must keep them)."""
    return (window - 1) * max(dilations) + 1


def layer_window(config, layer: int) -> int:
    return _per_layer(config.attention_window, layer)


def layer_dilation(config, layer: int) -> list[int]:
    """The dilation of every head of ``layer`` (one int per head)."""
    return _head_dilations(config.attention_dilation, layer, config.num_attention_heads)


def causal_span(config, layer: int) -> int:
    return window_span(layer_window(config, layer), layer_dilation(config, layer))


def sliding_layers(config) -> list[int]:
    return [i for i, family in enumerate(config.layer_families()) if family.name == SLIDING_FAMILY.name]


def derived_sliding_window(config) -> int | None:
    """``sliding_window`` as the other fields give it: the widest causal span of a sliding layer (what transformers'
    sliding-window cache keeps), None without sliding layers."""
    sliding = sliding_layers(config)
    return max(causal_span(config, layer) for layer in sliding) if sliding else None


def validate_sliding_config(config) -> dict:
    """Check the sliding-window fields of an ``XArchConfig``; every problem is a ValueError naming the field.
    Returns the values derived from them (``attention_window`` with its default, ``attention_dilation`` with lists
    as lists, ``sliding_window``) and never writes into ``config``: ``XArchConfig.__post_init__`` assigns them.
    Called once ``layer_types`` are known, and again by ``validate()`` (save) and model construction."""
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    sliding = sliding_layers(config)
    given_span = config.sliding_window
    if given_span is not None and not _positive_int(given_span):
        _fail("sliding_window", given_span, "a positive int (the key slots a causal sliding layer reads), or None")
    window = config.attention_window
    if window is None:
        # one setting, two names: Mistral-style configs give only `sliding_window`
        window = given_span if given_span is not None else DEFAULT_ATTENTION_WINDOW
    if isinstance(window, (list, tuple)):
        if len(window) != layers or not all(_positive_int(w) for w in window):
            _fail("attention_window", window, f"a positive int, or a list of num_hidden_layers={layers} positive ints")
        window = list(window)
    elif not _positive_int(window):
        _fail("attention_window", window, "a positive int (keys a query sees), or one per layer")
    dilation = config.attention_dilation
    entries = dilation if isinstance(dilation, (list, tuple)) else [1 if dilation is None else dilation] * layers
    if len(entries) != layers:
        _fail("attention_dilation", dilation, f"an int, or a list of num_hidden_layers={layers} entries")
    for entry in entries:
        if isinstance(entry, (list, tuple)):
            if len(entry) != heads or not all(_positive_int(d) for d in entry):
                _fail("attention_dilation", dilation, f"per-head entries: lists of num_attention_heads={heads} ints >= 1")
        elif not _positive_int(entry):
            _fail("attention_dilation", dilation, "ints >= 1 (1: no dilation), per model, per layer or per head")
    if isinstance(dilation, (list, tuple)):
        dilation = [list(e) if isinstance(e, (list, tuple)) else e for e in dilation]
    sink = config.attention_sink_size
    if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
        _fail("attention_sink_size", sink, "an int >= 0 (0: no attention sinks)")
    if not isinstance(config.global_projections, bool):
        _fail("global_projections", config.global_projections, "True or False")

    # options only sliding layers read: set elsewhere, they would be silently ignored
    read_by = f"read only by attention_type={SLIDING_FAMILY.name!r} layers"
    for layer in range(layers):
        if layer not in sliding and set(_head_dilations(dilation, layer, heads)) != {1}:
            _fail("attention_dilation", dilation,
                  f"1 (or None) for layer {layer} ({config.layer_types[layer]!r}): dilation is {read_by}")
    if not sliding:
        where = f"{read_by}, and no layer is one (layer_types={config.layer_types})"
        if sink:
            _fail("attention_sink_size", sink, f"0: sinks are {where}")
        if config.global_projections:
            _fail("global_projections", config.global_projections, f"False: global projections are {where}")
        return {"attention_window": window, "attention_dilation": dilation, "sliding_window": given_span}

    for layer in sliding:
        if not config.is_decoder and _per_layer(window, layer) % 2:
            _fail("attention_window", config.attention_window if config.attention_window is not None else window,
                  f"even windows in an encoder (w/2 keys on each side, as Longformer), but layer {layer} has "
                  f"{_per_layer(window, layer)}; a decoder (is_decoder=True) takes any window")
    if sink and not config.is_decoder:
        _fail("attention_sink_size", sink, "0 in an encoder (is_decoder=False): sinks are for decoders; an encoder "
              "marks tokens every position sees with global_attention_mask")
    if config.global_projections and config.is_decoder:
        _fail("global_projections", config.global_projections, "False in a decoder (is_decoder=True): the global "
              "projections serve global tokens (global_attention_mask), which only encoders have")
    span = max(window_span(_per_layer(window, layer), _head_dilations(dilation, layer, heads)) for layer in sliding)
    if given_span is not None and given_span != span:
        _fail(
            "sliding_window",
            given_span,
            f"None or {span}: it is derived from attention_window and attention_dilation ((w - 1) * max dilation + 1, "
            "the key slots a causal sliding layer reads and its cache keeps)",
        )
    return {"attention_window": window, "attention_dilation": dilation, "sliding_window": span}


def _clipped_steps(length: int, dilation: int, limit: int) -> int:
    """sum over p in [0, length) of min(p // dilation, limit): the keys d apart a band reaches on one side, summed."""
    reach = min(length, dilation * limit)
    q, r = divmod(reach, dilation)
    return dilation * q * (q - 1) // 2 + r * q + limit * (length - reach)


def sliding_window_attention_cost(config, layer: int, seq_len: int) -> AttentionCost:
    # Each head (its own dilation d) sees the keys of its band: itself, up to `left` keys d apart before it and
    # `right` after it (w-1 and 0 in a decoder, w/2 and w/2 in an encoder), clipped at the sequence ends; a decoder
    # with attention sinks also sees the first `attention_sink_size` tokens (Xiao et al. 2023). The cache keeps the
    # last sliding_window - 1 keys, plus the sinks (transformers' DynamicSlidingWindowLayer, our SinkSlidingWindowLayer)
    window, sinks = layer_window(config, layer), config.attention_sink_size
    left, right = (window - 1, 0) if config.is_decoder else (window // 2, window // 2)
    keys, last_keys = [], []
    for dilation in layer_dilation(config, layer):
        total = _clipped_steps(seq_len, dilation, left) + _clipped_steps(seq_len, dilation, right) + seq_len
        last = min((seq_len - 1) // dilation, left) + 1
        for sink in range(min(sinks, seq_len) if config.is_decoder else 0):
            # the positions at or after the sink that do not see it in their band see it as a sink
            after = seq_len - sink
            total += after - (min(after - 1, left * dilation) // dilation + 1)
            last += (seq_len - 1 - sink) % dilation != 0 or seq_len - 1 - sink > left * dilation
        keys.append(total / seq_len)
        last_keys.append(last)
    per_key = 4 * config.head_dim  # q·k and the weighted value, per head and key
    forward = per_key * sum(keys)  # the heads differ only by their dilation
    decode = per_key * sum(last_keys)
    cache = 0
    if config.is_decoder:
        kept = min(seq_len, config.sliding_window - 1) + min(sinks, max(0, seq_len - (config.sliding_window - 1)))
        cache = 2 * config.num_key_value_heads * config.head_dim * kept
    heads, width = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    projections = 2 * config.hidden_size * (2 * heads + 2 * width)  # q, k, v, o; the global ones serve global tokens
    note = "global tokens (global_attention_mask) add work that depends on the input and is not counted"
    return AttentionCost(forward, decode, cache, projections, note if not config.is_decoder else None)


def sliding_card_details(config) -> str:
    parts = [f"window {config.attention_window}"]
    if config.attention_dilation not in (1, None):
        parts.append(f"dilation {config.attention_dilation}")
    if config.attention_sink_size:
        parts.append(f"{config.attention_sink_size} attention-sink tokens")
    if not config.is_decoder:
        parts.append("global tokens through `global_attention_mask`")
    return ", ".join(parts)


LONGFORMER_CITATION = """@article{beltagy2020longformer,
  title={Longformer: The Long-Document Transformer}, author={Beltagy, Iz and Peters, Matthew E. and Cohan, Arman},
  journal={arXiv:2004.05150}, year={2020}}"""
STREAMINGLLM_CITATION = """@inproceedings{xiao2024efficient,
  title={Efficient Streaming Language Models with Attention Sinks}, author={Xiao, Guangxuan and Tian, Yuandong and Chen, Beidi and Han, Song and Lewis, Mike},
  booktitle={ICLR}, year={2024}}"""


def sliding_citations(config) -> tuple[str, ...]:
    return (LONGFORMER_CITATION, STREAMINGLLM_CITATION) if config.attention_sink_size else (LONGFORMER_CITATION,)


SLIDING_FAMILY = register_family(AttentionFamily(
    name="sliding_window",
    layer_type="sliding_attention",
    causal=True,
    bidirectional=True,
    global_tokens=True,
    additive_position_bias=True,
    rotary=True,
    cache_layer="sliding_window",
    paper="Beltagy et al. 2020 (Longformer); Child et al. 2019 (dilation); Xiao et al. 2023 (attention sinks)",
    description="each query sees a window of w keys (w/2 each side, or itself and w-1 before in a decoder), "
    "optionally dilated, plus global tokens (encoders) or attention sinks (decoders); O(N·w) time and memory",
    # no `options`: validate_sliding_config refuses its unread options itself (dilation is per layer, and
    # `attention_window` is transformers' `sliding_window`, which its common tests set on every model)
    validate=validate_sliding_config,
    cost=sliding_window_attention_cost,
    card_details=sliding_card_details,
    citations=sliding_citations,
))
