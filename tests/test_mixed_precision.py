"""bf16 mixed precision (``torch.autocast``) for every registered attention family and position scheme, on CPU:
forward and backward, cached decoding, the Performer kernels' fp32 compute, ``output_attentions`` on Performer
layers, and bf16 training through the pretrain recipe and ``Trainer``.

The cases are read from the registries, so a new family or position scheme is tested here the moment it is
registered, with the combinations its capability flags allow."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import DynamicCache, Trainer, TrainingArguments
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import hf_xarch  # noqa: F401  (registers every family and position scheme)
import hf_xarch.model.attention_performer as performer
from hf_xarch import XArchForCausalLM, XArchForMaskedLM, XArchModel
from hf_xarch.model.attention_performer import draw_projection, performer_attention, performer_attention_reference
from hf_xarch.model.registry import ATTENTION_FAMILIES, POSITION_SCHEMES
from hf_xarch.testing import allowed

from .helpers import left_padded_mask, random_ids, tiny_config

BF16 = torch.bfloat16
# bf16 keeps 8 significant bits, a relative rounding error of 2^-9 ≈ 0.2% per rounding; autocast rounds the inputs and
# outputs of every matmul of the tiny 2-layer model (about ten in a row), and the measured worst case over every
# family and scheme was 0.8% of the logits' range. 3% leaves room for that to grow while still failing on what a
# precision bug looks like: features or normalisers that lost their small terms, or a wrong dtype read, move the
# logits by tens of percent.
LOGIT_TOLERANCE = 0.03


pytestmark = pytest.mark.one_thread


CASES = [
    pytest.param(family.name, scheme.name, decoder, id=f"{family.name}-{scheme.name}-{'decoder' if decoder else 'encoder'}")
    for family in ATTENTION_FAMILIES.values()
    for scheme in POSITION_SCHEMES.values()
    for decoder in (True, False)
    if allowed(family, scheme, decoder)
]
DECODER_CASES = [pytest.param(*case.values[:2], id=case.id) for case in CASES if case.values[2]]


def tiny_model(family: str, scheme: str, decoder: bool):
    """In eval mode: no dropout and no Performer feature redraws, so the fp32 and the bf16 runs compute one function
    (backward works in eval mode as well)."""
    torch.manual_seed(0)
    config = tiny_config(attention_type=family, position_embedding_type=scheme, is_decoder=decoder)
    return (XArchForCausalLM if decoder else XArchForMaskedLM)(config).eval()


def inputs():
    """Two rows of 16 tokens, the first with 3 tokens of left padding."""
    return random_ids(2, 16, seed=1), left_padded_mask([13, 16], 16)


def assert_close_to_fp32(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> None:
    real = mask.bool()  # padded positions' outputs are not defined
    error = (logits.float() - reference)[real].abs().max()
    assert error <= LOGIT_TOLERANCE * reference[real].abs().max(), f"bf16 logits off by {error:.4f}"


@pytest.mark.parametrize(("family", "scheme", "decoder"), CASES)
def test_forward_and_backward_under_bf16_autocast(family, scheme, decoder):
    if family == "lsh":
        # a bucket is an argmax of the layer's input, and bf16 rounds the input of every layer after the first: a
        # token near a bucket boundary may attend to other keys (a valid LSH model, not a precision bug). Hashing
        # itself runs in fp32, tested on one layer in test_lsh.py
        pytest.skip("LSH buckets of layers after the first depend on bf16 rounding of their input")
    model = tiny_model(family, scheme, decoder)
    ids, mask = inputs()
    extra = {}
    if ATTENTION_FAMILIES[family].global_tokens and not decoder:  # Longformer's global tokens, where a family has them
        extra["global_attention_mask"] = torch.zeros_like(ids).index_fill_(1, torch.tensor([5]), 1)
    reference = model(ids, attention_mask=mask, labels=ids, **extra)
    reference.loss.backward()
    expected = {name for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16):
        output = model(ids, attention_mask=mask, labels=ids, **extra)
    assert output.logits.dtype == BF16  # autocast reached the model: this really was a mixed-precision run
    output.loss.backward()
    assert torch.isfinite(output.loss)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == expected  # the graph reaches every parameter it reaches in fp32
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    assert_close_to_fp32(output.logits, reference.logits, mask)


@pytest.mark.parametrize(("family", "scheme"), DECODER_CASES)
def test_cached_decoding_under_bf16_autocast(family, scheme):
    """Token by token through the cache, under autocast, against the fp32 forward over the whole sequence."""
    model = tiny_model(family, scheme, decoder=True)
    ids, mask = inputs()
    steps = []
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        with torch.autocast("cpu", dtype=BF16):
            for t in range(ids.shape[1]):
                step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
                steps.append(step.logits)
    assert all(step.dtype == BF16 for step in steps)
    assert_close_to_fp32(torch.cat(steps, dim=1), reference, mask)


# ---- the Performer kernels: fp32 inside, the same result with and without autocast ----------------------------------
def bf16_qkv(seed: int, length: int = 40):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, length, 16, generator=generator).to(BF16).requires_grad_() for _ in range(3)]


def run_kernel(function, q, k, v, autocast: bool, **kwargs):
    """Output and the input gradients of one call, the forward under autocast or not (backward outside it, as
    torch recommends and Trainer and Accelerate do)."""
    for t in (q, k, v):
        t.grad = None
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = function(q, k, v, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().sum().backward()
    return out.detach(), [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("kernel", "floor"), [("softmax", 0.0), ("softmax", 1e-3), ("relu", 0.0)])
def test_performer_kernels_compute_the_same_under_autocast(causal, kernel, floor):
    """bf16 inputs give the same output (in bf16) and gradients with autocast on as off: the kernels compute in fp32
    either way (autocast used to run their matmuls in bf16 next to fp32 sums, and crashed)."""
    q, k, v = bf16_qkv(seed=3)
    mask = left_padded_mask([34, 40], 40).bool()
    kwargs = {"projection": draw_projection(24, 16, seed=5), "kernel": kernel, "causal": causal, "key_mask": mask,
              "feature_floor": floor}
    fast_path = functools.partial(performer_attention, chunk_size=8)  # several chunks per sequence
    for function in (fast_path, performer_attention_reference):
        plain, plain_grads = run_kernel(function, q, k, v, autocast=False, **kwargs)
        mixed, mixed_grads = run_kernel(function, q, k, v, autocast=True, **kwargs)
        assert plain.dtype == mixed.dtype == BF16
        torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
        for a, b in zip(mixed_grads, plain_grads):
            assert a.dtype == BF16
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the fast path still matches the reference in fp32 compute (same rounding of the bf16 output)
    fast, _ = run_kernel(fast_path, q, k, v, autocast=True, **kwargs)
    reference, _ = run_kernel(performer_attention_reference, q, k, v, autocast=True, **kwargs)
    torch.testing.assert_close(fast.float(), reference.float(), rtol=2**-7, atol=1e-3)


def test_performer_decoding_state_stays_fp32_under_autocast():
    """The cached state (running sums, normalisers, key frame) is kept in fp32 and updated in place step by step;
    decoding under autocast equals decoding the same bf16 inputs without it."""
    q, k, v = (t.detach() for t in bf16_qkv(seed=4, length=6))
    projection = draw_projection(24, 16, seed=6)

    def decode(**kwargs):
        state, outputs = None, []
        for t in range(q.shape[2]):
            part = slice(t, t + 1)
            out, state = performer_attention(q[:, :, part], k[:, :, part], v[:, :, part], projection, causal=True,
                                             state=state, feature_floor=1e-3, **kwargs)
            outputs.append(out)
        return torch.cat(outputs, dim=2), state

    with torch.no_grad():
        plain, plain_state = decode()
        with torch.autocast("cpu", dtype=BF16):
            mixed, mixed_state = decode()
    assert mixed.dtype == BF16 and all(t.dtype == torch.float32 for t in mixed_state)
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
    for a, b in zip(mixed_state, plain_state):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- output_attentions on Performer layers --------------------------------------------------------------------------
def test_performer_output_attentions_warns_and_returns_only_other_layers_weights():
    """A Performer has no attention matrix: like transformers' sdpa, it warns (once) instead of returning weights;
    a full-attention layer beside it still returns its own."""
    config = tiny_config(attention_type="performer", layer_types=["full", "performer"], is_decoder=True)
    model = XArchModel(config).eval()
    model.set_attn_implementation("eager")
    logging.warning_once.cache_clear()  # once per process: another test may have triggered it
    with CaptureLogger(performer.logger) as captured, torch.no_grad():
        output = model(random_ids(2, 8, seed=2), output_attentions=True)
    assert "performer_attention layers" in captured.out and "output_attentions=True" in captured.out
    assert len(output.attentions) == 1 and output.attentions[0].shape == (2, 4, 8, 8)  # the full layer's
    with CaptureLogger(performer.logger) as captured, torch.no_grad():
        model(random_ids(2, 8, seed=2))
    assert captured.out == ""  # nothing without output_attentions


# ---- bf16 training: the pretrain recipe and Trainer -----------------------------------------------------------------
def test_pretrain_recipe_trains_a_performer_in_bf16(tmp_path):
    from accelerate.state import AcceleratorState

    from hf_xarch.train.pretrain import run_pretrain

    from .test_train_recipes import _pretrain_cfg

    try:
        result = run_pretrain(_pretrain_cfg(tmp_path, "model.attention_type=performer", "training.mixed_precision=bf16",
                                            "training.max_steps=2", "checkpoint.every_steps=0",
                                            "logging.tensorboard=false"))
        assert AcceleratorState().mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state()  # later tests in this process build their own fp32 Accelerator
    assert result.loop.step == 2 and all(math.isfinite(r["train/loss"]) for r in result.loop.history)
    model = result.loop.model
    assert model.config.attention_type == "performer" and next(model.parameters()).dtype == torch.float32


def test_trainer_trains_a_performer_in_bf16_on_cpu(tmp_path):
    config = tiny_config(attention_type="performer", is_decoder=True)
    ids = random_ids(8, 12, seed=3)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, bf16=True,
                             use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0)
    torch.manual_seed(0)
    model = XArchForCausalLM(config)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(after, before))
