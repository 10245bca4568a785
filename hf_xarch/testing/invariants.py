"""The invariants every attention family must keep, each a function of one ``FamilyCase``.

Each check builds a tiny random model of the case, raises ``AssertionError`` that says in plain words what broke and
where ("decoder position 3 is influenced by position 5"), and returns a short description of what it checked.
Inputs use odd lengths, batches of several rows and padding on either side; every case draws its own seeds.
"""

from __future__ import annotations

import math
import tempfile

import torch
from transformers import DynamicCache

from ..model.registry import POSITION_SCHEMES
from .cases import FamilyCase

# outputs of the tiny models are O(1) (a final norm); fp32 paths that compute one function in a different order agree
# to ~1e-6, a family that breaks an invariant moves them by ~1e-2
TOLERANCE = 1e-5
LENGTH = 13  # odd, longer than a small window, shorter than max_position_embeddings
ROW_LENGTHS = (13, 8, 5)


def _fail(case: FamilyCase, invariant: str, message: str):
    raise AssertionError(f"{case.id}: {invariant}: {message}")


def _scale(tensor: torch.Tensor) -> float:
    return TOLERANCE * (1.0 + float(tensor.detach().abs().max())) if tensor.numel() else TOLERANCE


def _hidden(model, ids, mask=None, **kwargs) -> torch.Tensor:
    return model(ids, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state


def _padding_mask(side: str, lengths=ROW_LENGTHS, total: int = LENGTH) -> torch.Tensor:
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "left":
            mask[row, total - length :] = 1
        else:
            mask[row, :length] = 1
    return mask


def influence(model, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, float]:
    """A (length, length) matrix whose entry [i, j] is how far the output at position i moves when token j alone
    changes (one forward of a batch: the sequence, then one copy per position with that token replaced), and the
    tolerance below which a move is rounding."""
    length, vocab = ids.shape[1], model.config.vocab_size
    variants = ids.repeat(length + 1, 1)
    for j in range(length):
        variants[j + 1, j] = variants[j + 1, j] % (vocab - 1) + 1  # another token, never the padding id 0
    kwargs = {key: value.repeat(length + 1, 1) for key, value in kwargs.items()}
    with torch.no_grad():
        out = _hidden(model, variants, **kwargs)
    return (out[1:] - out[:1]).abs().amax(-1).T, _scale(out[0])


def _paths(case: FamilyCase, model):
    """Set each path in turn: the default one, then the family's reference (when it is another): (name, suffix)."""
    default, reference = model.config._attn_implementation, case.record.reference_implementation
    for implementation in dict.fromkeys((default, reference)):
        model.set_attn_implementation(implementation)
        yield implementation, "" if implementation == default else f" (on the {implementation!r} reference path)"


def _path_names(case: FamilyCase, model) -> str:
    return " and ".join(repr(name) for name, _ in _paths(case, model))


def check_visibility(case: FamilyCase) -> str:
    """Decoder: no position sees the future. Encoder: positions see later ones (the family is bidirectional).
    On the default path and on the reference."""
    model, ids = case.model(), case.ids(1, LENGTH, "visibility")
    for _, where in _paths(case, model):
        moved, tolerance = influence(model, ids)
        if case.decoder:
            leaks = (moved > tolerance).triu(1).nonzero().tolist()
            if leaks:
                i, j = leaks[0]
                _fail(case, "visibility", f"decoder position {i} is influenced by position {j}{where} (its output "
                      f"moves by {float(moved[i, j]):.2e}); {len(leaks)} (position, future position) pairs leak in all")
        elif not bool((moved > tolerance).triu(1).any()):
            _fail(case, "visibility", f"no encoder position is influenced by any later position{where}: the family "
                  "declares bidirectional=True but behaves causally")
    what = "no decoder position is influenced by a later one" if case.decoder else "encoder positions see later ones"
    return f"{what} ({_path_names(case, model)})"


def check_padding(case: FamilyCase) -> str:
    """Outputs at real tokens do not change when rows are padded (left and right) and batched (on the default path
    and on the reference)."""
    model = case.model()
    ids = case.ids(len(ROW_LENGTHS), LENGTH, "padding")
    for _, where in _paths(case, model):
        for side in ("left", "right"):
            mask = _padding_mask(side)
            with torch.no_grad():
                batched = _hidden(model, ids, mask)
                alone = [_hidden(model, ids[row : row + 1, mask[row].bool()])[0] for row in range(len(ROW_LENGTHS))]
            for row, length in enumerate(ROW_LENGTHS):
                moved = (batched[row, mask[row].bool()] - alone[row]).abs().amax(-1)
                if bool((moved > _scale(alone[row])).any()):
                    token = int(moved.argmax())
                    _fail(case, "padding", f"row {row} ({LENGTH - length} tokens of {side} padding): the output at "
                          f"real token {token} moves by {float(moved[token]):.2e} when the row is padded and "
                          f"batched{where}")
    return f"outputs at real tokens ignore left and right padding in a batch ({_path_names(case, model)})"


def check_reference(case: FamilyCase) -> str:
    """The default path equals the family's plain reference (``reference_implementation``), forward and backward."""
    reference = case.record.reference_implementation
    model = case.model()
    default = model.config._attn_implementation
    ids, mask = case.ids(len(ROW_LENGTHS), LENGTH, "reference"), _padding_mask("left" if case.decoder else "right")
    real = mask.bool()
    weights = torch.randn(*ids.shape, model.config.hidden_size, generator=case.generator("loss"))
    results = {}
    for implementation in (default, reference):
        model.set_attn_implementation(implementation)
        model.zero_grad(set_to_none=True)
        hidden = _hidden(model, ids, mask)
        (hidden * weights)[real].sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[implementation] = hidden.detach(), grads
    (fast, fast_grads), (slow, slow_grads) = results[default], results[reference]
    moved = (fast - slow).abs().amax(-1).masked_fill(~real, 0)
    if float(moved.max()) > _scale(slow):
        row, position = divmod(int(moved.argmax()), LENGTH)
        _fail(case, "reference", f"the {default!r} path differs from the {reference!r} reference at row {row}, "
              f"position {position} (by {float(moved.max()):.2e})")
    if set(fast_grads) != set(slow_grads):
        _fail(case, "reference", f"gradients reach different parameters: only on the {default!r} path: "
              f"{sorted(set(fast_grads) - set(slow_grads))}, only on the reference: {sorted(set(slow_grads) - set(fast_grads))}")
    for name, grad in slow_grads.items():
        gap = float((fast_grads[name] - grad).abs().max())
        if gap > 1e-4 * (1.0 + float(grad.abs().max())):
            _fail(case, "reference", f"the gradient of {name} on the {default!r} path differs from the {reference!r} "
                  f"reference (by {gap:.2e})")
    if default == reference:
        return f"the default path is the reference itself ({reference!r})"
    return f"the {default!r} path equals the {reference!r} reference, forward and backward"


def check_cached_decode(case: FamilyCase) -> str:
    """Decoding through the cache equals the full forward (on the default path and on the reference): one unpadded
    row from a one-token prefill, and a left-padded batch from a longer prefill; single tokens and chunks of several."""
    model = case.model()
    scenarios = [  # (ids, mask, (start, end) of each step)
        (case.ids(1, LENGTH, "decode-one"), torch.ones(1, LENGTH, dtype=torch.long), [(0, 1), (1, 2), (2, 6), (6, 7),
                                                                                      (7, LENGTH)]),
        (case.ids(2, LENGTH, "decode"), _padding_mask("left", (LENGTH, 7)), [(0, 7), (7, 8), (8, 9), (9, LENGTH)]),
    ]
    for _, where in _paths(case, model):
        for ids, mask, steps in scenarios:
            _decode_steps(case, model, ids, mask, steps, where)
    return ("a one-token prefill and a padded batch's prefill, then single tokens and chunks through the cache, "
            f"equal the full forward ({_path_names(case, model)})")


def _decode_steps(case, model, ids, mask, steps, where) -> None:
    real = mask.bool()
    with torch.no_grad():
        full = _hidden(model, ids, mask)
        cache = DynamicCache(config=model.config)
        for number, (start, end) in enumerate(steps):
            out = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
            cache = out.cache
            moved = (out.last_hidden_state - full[:, start:end]).abs().amax(-1).masked_fill(~real[:, start:end], 0)
            if float(moved.max()) > _scale(full):
                row, offset = divmod(int(moved.argmax()), end - start)
                what = f"the prefill of {end}" if number == 0 else f"decode step {number} ({end - start} token(s) " \
                    f"after {start})"
                _fail(case, "cached_decode", f"cached decode drifts from the full forward at position {start + offset} "
                      f"of row {row} of {ids.shape[0]}, in {what}{where}: by {float(moved.max()):.2e}")


def check_save_reload(case: FamilyCase) -> str:
    """save_pretrained then from_pretrained gives a model with identical outputs."""
    model = case.model()
    ids, mask = case.ids(len(ROW_LENGTHS), LENGTH, "reload"), _padding_mask("left")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = type(model).from_pretrained(folder).eval()
    with torch.no_grad():
        before, after = _hidden(model, ids, mask), _hidden(reloaded, ids, mask)
    if not torch.equal(before, after):
        _fail(case, "save_reload", f"the reloaded model's outputs differ (by {float((before - after).abs().max()):.2e})"
              f"{_differing_tensors(model, reloaded)}")
    return "a saved and reloaded model gives identical outputs"


def _differing_tensors(model, other) -> str:
    theirs = dict(other.state_dict())
    theirs.update(dict(other.named_buffers()))
    ours = dict(model.state_dict())
    ours.update(dict(model.named_buffers()))
    names = [name for name, tensor in ours.items() if name in theirs and not torch.equal(tensor, theirs[name])]
    return f"; tensors that differ: {names}" if names else ""


def check_meta_init(case: FamilyCase) -> str:
    """A model built on the meta device, materialised with ``to_empty`` and ``init_weights`` (FSDP's and
    ``from_pretrained``'s way), is a working model, and with the original's weights loaded it is the original."""
    original = case.model()
    ids, mask = case.ids(len(ROW_LENGTHS), LENGTH, "meta"), _padding_mask("left")
    with torch.device("meta"):
        model = type(original)(original.config).eval()
    model.to_empty(device="cpu")
    model.init_weights()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            _fail(case, "meta_init", f"after a meta-device build and init_weights, {name} holds non-finite values "
                  "(_init_weights does not rebuild it)")
    with torch.no_grad():
        if not bool(torch.isfinite(_hidden(model, ids, mask)).all()):
            _fail(case, "meta_init", "a meta-device build followed by init_weights gives non-finite outputs")
        model.load_state_dict(original.state_dict(), strict=True)
        if not torch.equal(_hidden(model, ids, mask), _hidden(original, ids, mask)):
            _fail(case, "meta_init", "a meta-device build, init_weights and the original's weights do not give the "
                  f"original's outputs{_differing_tensors(original, model)} (buffers no checkpoint holds must be "
                  "rebuilt by _init_weights)")
    return "a meta-device build with init_weights works, and with the original's weights is the original"


def check_summary_cost(case: FamilyCase) -> str:
    """``hf_xarch.summary`` knows what the family costs (FLOPs, and cache bytes for a decoder)."""
    from ..summary import summary

    config = case.config()
    if case.record.cost is None:
        _fail(case, "summary_cost", "the family's record has no cost function, so summary reports its FLOPs and "
              "cache as unknown")
    for seq_len in (1, 64, 4096):
        cost = case.record.cost(config, 0, seq_len)
        for what in ("forward_flops", "decode_flops", "cache_values"):
            value = getattr(cost, what)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                _fail(case, "summary_cost", f"cost(config, 0, seq_len={seq_len}).{what} = {value!r}, not a finite "
                      "number >= 0")
    result = summary(config, seq_len=64)
    unknown = [result.training_flops_per_token, result.inference_flops_per_token]
    if case.decoder:
        unknown.append(result.kv_cache_bytes_per_token)
    if result.unknown_families or any(value is None for value in unknown):
        _fail(case, "summary_cost", f"summary reports unknown costs (unknown_families={result.unknown_families})")
    return "summary reports FLOPs per token and cache bytes"


def check_capabilities(case: FamilyCase) -> str:
    """Every capability flag is honest: refused combinations raise ValueError at config build, global tokens are
    refused or honoured as declared, and the cache holds the declared cache layer."""
    record, checked = case.record, []
    for decoder, able, flag in ((True, record.causal, "causal"), (False, record.bidirectional, "bidirectional")):
        if not able:
            _expect_value_error(case, f"{flag}=False", lambda d=decoder: case.config(is_decoder=d))
            checked.append(f"{flag}=False refused")
    for scheme in POSITION_SCHEMES.values():
        flag = {"bias": "additive_position_bias", "rotary": "rotary"}.get(scheme.kind)
        if flag and not getattr(record, flag):
            _expect_value_error(case, f"{flag}=False", lambda s=scheme.name: case.config(position_embedding_type=s))
            checked.append(f"{scheme.name} refused")
    model = case.model()
    ids, mask = case.ids(2, LENGTH, "global"), _padding_mask("right", (LENGTH, 9))
    flags = torch.zeros_like(ids)
    flags[:, 1] = 1
    if not record.global_tokens or case.decoder:
        why = "global_tokens=False" if not record.global_tokens else "a decoder (global tokens would see the future)"
        _expect_value_error(case, why, lambda: model(ids, attention_mask=mask, global_attention_mask=flags))
        checked.append("global_attention_mask refused")
    else:
        moved, tolerance = influence(model, ids[:1], global_attention_mask=flags[:1])
        last = LENGTH - 1
        if not float(moved[1, last]) > tolerance or not float(moved[last, 1]) > tolerance:
            _fail(case, "capabilities", f"global_tokens=True, but global position 1 and position {last} do not "
                  "see each other")
        checked.append("global tokens see and are seen by every position")
    checked.append(_check_attention_dropout(case))
    if case.decoder and record.cache_layer_class is not None:
        cache = DynamicCache(config=model.config)
        found = {type(layer).__name__ for layer in cache.layers}
        if not all(isinstance(layer, record.cache_layer_class) for layer in cache.layers):
            _fail(case, "capabilities", f"cache_layer_class={record.cache_layer_class.__name__}, but "
                  f"DynamicCache(config=...) builds {sorted(found)}")
        checked.append(f"the cache holds {record.cache_layer_class.__name__} layers")
    return "; ".join(checked)


def _check_attention_dropout(case: FamilyCase) -> str:
    """``attention_weights``: a family with weights drops them in training (attention_dropout changes the output of
    a training-mode forward); one without has nothing to drop (the output is the same, random draws seeded alike)."""
    from ..model.modeling_xarch import XArchModel

    ids, outputs = case.ids(2, LENGTH), []
    for dropout in (0.0, 0.5):
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=case.generator("weights"))))
        model = XArchModel(case.config(attention_dropout=dropout)).train()
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=case.generator("dropout"))))
        with torch.no_grad():
            outputs.append(_hidden(model, ids))
    moved = float((outputs[1] - outputs[0]).abs().max())
    if case.record.attention_weights and not moved > _scale(outputs[0]):
        _fail(case, "capabilities", "attention_weights=True, but attention_dropout=0.5 leaves a training-mode "
              "forward unchanged (the weights are not dropped)")
    if not case.record.attention_weights and moved > _scale(outputs[0]):
        _fail(case, "capabilities", f"attention_weights=False, but attention_dropout=0.5 moves a training-mode "
              f"forward by {moved:.3g}")
    return "attention_dropout " + ("drops the weights in training" if case.record.attention_weights
                                   else "has nothing to drop")


def _expect_value_error(case: FamilyCase, flag: str, build) -> None:
    try:
        build()
    except ValueError:
        return
    _fail(case, "capabilities", f"the family declares {flag}, yet this was accepted without a ValueError")


INVARIANTS = {
    "visibility": check_visibility,
    "padding": check_padding,
    "reference": check_reference,
    "cached_decode": check_cached_decode,
    "save_reload": check_save_reload,
    "meta_init": check_meta_init,
    "summary_cost": check_summary_cost,
    "capabilities": check_capabilities,
}
DECODER_ONLY = {"cached_decode"}


def invariants_for(case: FamilyCase) -> list[str]:
    """The invariants that apply to a case (cached decoding is for decoders only)."""
    return [name for name in INVARIANTS if case.decoder or name not in DECODER_ONLY]


def check_case(case: FamilyCase, invariant: str) -> str:
    """Check one invariant on one case; raises AssertionError naming what broke, returns what was checked."""
    if invariant not in INVARIANTS:
        raise ValueError(f"invariant={invariant!r} is not one of {list(INVARIANTS)}")
    return INVARIANTS[invariant](case)


__all__ = ["INVARIANTS", "check_case", "influence", "invariants_for"]
