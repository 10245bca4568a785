"""``attn_implementation="xarch_sliding_window"`` in stock transformers models: same logits and generations as their
own masking, with the banded kernel doing the work."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

import hf_xarch  # noqa: F401  (importing registers the interface, through modeling_xarch)
from hf_xarch.model import attention_sliding
from hf_xarch.model.attention_sliding import BandMask, _band_extent

SIZES = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture
def banded_calls(monkeypatch):
    calls = []
    original = attention_sliding.banded_attention

    def counting(*args, **kwargs):
        calls.append(args[3:5])  # (left, right)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_sliding, "banded_attention", counting)
    return calls


def test_mistral_gives_its_own_logits_and_generations(banded_calls):
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(sliding_window=5, **SIZES)).eval()
    ids = torch.randint(1, 99, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    reference = model(ids, attention_mask=mask).logits
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    model.set_attn_implementation("xarch_sliding_window")
    logits = model(ids, attention_mask=mask).logits
    assert ((logits - reference) * mask[..., None]).abs().max() < 1e-5
    assert banded_calls and set(banded_calls) == {(4, 0)}  # every layer ran the band: itself and 4 before
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), expected)


def test_llama_full_causal_layers_fall_back_to_sdpa(banded_calls):
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    ids = torch.randint(1, 99, (2, 17))
    reference = model(ids).logits
    model.set_attn_implementation("xarch_sliding_window")
    assert (model(ids).logits - reference).abs().max() < 1e-5
    assert not banded_calls  # a full causal mask is not a band narrower than the keys


def test_band_recognition():
    extent = _band_extent(sliding_window_causal_mask_function(6), 40, 40, 0, 0, "cpu")
    assert extent == (5, 0)
    assert _band_extent(causal_mask_function, 40, 40, 0, 0, "cpu") == (39, 0)

    def checkerboard(b, h, q, kv):
        return (q + kv) % 2 == 0

    assert _band_extent(checkerboard, 12, 12, 0, 0, "cpu") is None
    mask = attention_sliding.xarch_sliding_window_mask(
        1, 10, 10, mask_function=sliding_window_causal_mask_function(3), attention_mask=torch.ones(1, 10).bool()
    )
    assert isinstance(mask, BandMask) and (mask.left, mask.right, mask.key_valid) == (2, 0, None)
