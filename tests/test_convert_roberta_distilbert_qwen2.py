"""RoBERTa, XLM-RoBERTa, DistilBERT and Qwen2 <-> XArch: identical outputs (fp32, 1e-5) on padded batches, the round
trip back to transformers gives the same weights, and the config options they need (``position_offset``,
``qkv_bias``) are checked when the config is built.

Tiny random models (hidden 32, 2 layers, vocab 99) are built from transformers' config classes.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DistilBertConfig, Qwen2Config, RobertaConfig, XLMRobertaConfig
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

from hf_xarch import XArchConfig, XArchForCausalLM, XArchModel
from hf_xarch.convert import from_hf, to_hf
from hf_xarch.model.modeling_xarch import default_position_ids

from .helpers import left_padded_mask, random_ids, tiny_config

ATOL = 1e-5
SIZES = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}


def built(config_class, class_name: str, seed: int, init: dict | None = None, **overrides):
    """A random transformers model whose norms are not all ones (a mixed-up norm cannot pass)."""
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config_class(**overrides), **(init or {})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                param.uniform_(0.5, 1.5)
    return model


def padded_batch(pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 11: unpadded, right-padded (7 real), left-padded (5 real); pads hold the pad id."""
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2] = left_padded_mask([5], 11)[0]
    ids = random_ids(3, 11, seed=seed, low=3).masked_fill(mask == 0, pad)
    return ids, mask


def outputs(model, **inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    first = out.start_logits if hasattr(out, "start_logits") else getattr(out, "logits", None)
    return (out.last_hidden_state if first is None else first), out.hidden_states


def assert_same_function(hf, xarch, where: torch.Tensor | None = None, **inputs):
    """Head outputs and every layer's hidden states agree (at ``where``, a bool (batch, seq) mask, or everywhere)."""
    (hf_out, hf_hidden), (x_out, x_hidden) = outputs(hf, **inputs), outputs(xarch, **inputs)
    def pick(tensor):  # per-token outputs at `where`; per-sequence ones (a classifier's) whole
        return tensor[where] if where is not None and tensor.shape[:2] == where.shape else tensor

    torch.testing.assert_close(pick(x_out), pick(hf_out), atol=ATOL, rtol=0)
    for got, expected in zip(x_hidden, hf_hidden, strict=True):
        torch.testing.assert_close(pick(got), pick(expected), atol=ATOL, rtol=0)


def assert_round_trip(hf, xarch, class_name: str, **inputs):
    back = to_hf(xarch, class_name)
    assert type(back) is type(hf)
    original, returned = hf.state_dict(), back.state_dict()
    assert set(original) == set(returned)
    for key, tensor in original.items():
        assert torch.equal(returned[key], tensor), key
    assert_same_function(hf, back.eval(), **inputs)


# ---- RoBERTa / XLM-RoBERTa: fairseq positions through `position_offset` ------------------------------------------
ROBERTA_HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"]


@pytest.mark.parametrize("prefix,config_class", [("Roberta", RobertaConfig), ("XLMRoberta", XLMRobertaConfig)])
@pytest.mark.parametrize("head", ROBERTA_HEADS)
def test_roberta_matches_everywhere_with_left_and_right_padding_and_round_trips(prefix, config_class, head):
    seed = 10 * ROBERTA_HEADS.index(head) + len(prefix)
    class_name = prefix + head
    init = {"add_pooling_layer": False} if head == "Model" else {}  # XArchModel has no pooler (BERT drops it too)
    hf = built(config_class, class_name, seed, init, **SIZES, max_position_embeddings=20, pad_token_id=1)
    xarch = from_hf(hf)
    assert xarch.config.position_offset == 2
    ids, mask = padded_batch(pad=1, seed=seed)
    # padding included: a padding token takes position pad_token_id in both
    assert_same_function(hf, xarch, input_ids=ids, attention_mask=mask)
    assert_round_trip(hf, xarch, class_name, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("pad", [0, 1, 5])
def test_position_offset_numbers_positions_as_roberta(pad):
    ids, mask = padded_batch(pad=pad, seed=pad)
    expected = RobertaEmbeddings.create_position_ids_from_input_ids(ids, pad)
    assert torch.equal(default_position_ids(11, mask, 0, ids.device, offset=pad + 1), expected)
    unpadded = torch.arange(11).unsqueeze(0) + pad + 1  # no mask: the first position is the offset
    assert torch.equal(default_position_ids(11, None, 0, ids.device, offset=pad + 1), unpadded)


def test_roberta_lm_head_needs_gelu_and_causal_roberta_is_refused():
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        from_hf(built(RobertaConfig, "RobertaForMaskedLM", 1, **SIZES, hidden_act="relu"))
    with pytest.raises(ValueError, match="is_decoder=True"):
        from_hf(built(RobertaConfig, "RobertaModel", 1, **SIZES, is_decoder=True))


def test_exports_check_position_offset():
    bert_like = {"norm_position": "post", "final_norm": False, "embedding_norm": True, "type_vocab_size": 2, "pad_token_id": 1}
    with pytest.raises(ValueError, match="position_offset=2, but BERT needs 0"):
        to_hf(XArchModel(tiny_config(**bert_like, position_offset=2)), "bert")
    with pytest.raises(ValueError, match="position_offset=0, but RoBERTa needs 2"):
        to_hf(XArchModel(tiny_config(**bert_like)), "roberta")


# ---- DistilBERT ----------------------------------------------------------------------------------------------------
DISTILBERT_SIZES = {"vocab_size": 99, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 37, "max_position_embeddings": 20}


@pytest.mark.parametrize("sinusoidal", [False, True])
@pytest.mark.parametrize("head", ["Model", "ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering"])
def test_distilbert_matches_and_round_trips(head, sinusoidal):
    class_name = "DistilBert" + head
    hf = built(DistilBertConfig, class_name, len(head) + sinusoidal, **DISTILBERT_SIZES, sinusoidal_pos_embds=sinusoidal)
    xarch = from_hf(hf)
    ids, mask = padded_batch(pad=0, seed=len(head))
    # DistilBERT numbers positions 0..n-1 whatever the mask: passing them reproduces it on the left-padded row too
    # (outputs at padding differ: DistilBERT's attention mask hides the padding rows too, XArch's only the keys)
    positions = torch.arange(11).expand(3, -1)
    assert_same_function(hf, xarch, mask.bool(), input_ids=ids, attention_mask=mask, position_ids=positions)
    right_padded = mask[:2]  # without position_ids both agree at every real token of unpadded and right-padded rows
    assert_same_function(hf, xarch, right_padded.bool(), input_ids=ids[:2], attention_mask=right_padded)
    back = to_hf(xarch, class_name)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_distilbert_sequence_classification_is_refused():
    with pytest.raises(ValueError, match="DistilBertForSequenceClassification has no XArch counterpart"):
        from_hf(built(DistilBertConfig, "DistilBertForSequenceClassification", 0, **DISTILBERT_SIZES))


# ---- Qwen2: Llama plus q/k/v biases (`qkv_bias`) ---------------------------------------------------------------------
QWEN2_SIZES = dict(**SIZES, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, tie_word_embeddings=False)


def qwen2(seed: int, class_name: str = "Qwen2ForCausalLM", **overrides):
    hf = built(Qwen2Config, class_name, seed, **{**QWEN2_SIZES, **overrides})
    with torch.no_grad():  # Qwen2 initialises biases at zero: random ones, so a dropped bias cannot pass
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return hf


@pytest.mark.parametrize("class_name", ["Qwen2ForCausalLM", "Qwen2Model", "Qwen2ForSequenceClassification",
                                        "Qwen2ForTokenClassification"])
def test_qwen2_matches_with_padding_and_round_trips(class_name):
    hf = qwen2(len(class_name), class_name)
    xarch = from_hf(hf)
    assert (xarch.config.qkv_bias, xarch.config.attention_bias, xarch.config.mlp_bias) == (True, False, False)
    attention = xarch.base_model.layers[0].attention
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    ids, mask = padded_batch(pad=0, seed=len(class_name))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes, and what XArch computes by itself
    real = mask.bool()
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        expected, expected_hidden = outputs(hf, **inputs, position_ids=positions)
        got, got_hidden = outputs(xarch, **inputs)
    torch.testing.assert_close(got[real] if got.dim() > 2 else got, expected[real] if got.dim() > 2 else expected,
                               atol=ATOL, rtol=0)
    for layer_got, layer_expected in zip(got_hidden, expected_hidden, strict=True):
        torch.testing.assert_close(layer_got[real], layer_expected[real], atol=ATOL, rtol=0)
    assert_round_trip(hf, xarch, class_name, **inputs, position_ids=positions)


def test_qwen2_cached_decode_and_greedy_generate_match():
    hf = qwen2(7)
    xarch = from_hf(hf)
    assert isinstance(xarch, XArchForCausalLM)
    ids = random_ids(2, 12, seed=7, low=3)
    mask = left_padded_mask([12, 8], 12)
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        full = xarch(ids, attention_mask=mask).logits
        prefix = xarch(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        cache, steps = prefix.past_key_values, [prefix.logits]
        for t in range(7, 12):
            step = xarch(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=ATOL, rtol=0)
    kwargs = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(xarch.generate(ids, **kwargs), hf.generate(ids, **kwargs))


def test_qwen2_sliding_window_is_refused_and_llama_export_names_qkv_bias():
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        from_hf(qwen2(3, use_sliding_window=True, sliding_window=4, max_window_layers=1))
    with pytest.raises(ValueError, match="qkv_bias=True, but Llama needs False"):
        to_hf(from_hf(qwen2(3)), "llama")


# ---- the config options ----------------------------------------------------------------------------------------------
def test_qkv_bias_defaults_to_attention_bias_and_splits_from_it():
    assert XArchConfig(attention_bias=False).qkv_bias is False
    assert XArchConfig().qkv_bias is True
    attention = XArchModel(tiny_config(qkv_bias=False)).layers[0].attention
    assert attention.q_proj.bias is None and attention.v_proj.bias is None and attention.o_proj.bias is not None


@pytest.mark.parametrize("overrides,allowed", [
    ({"qkv_bias": "yes"}, "qkv_bias='yes'"),
    ({"position_offset": -1}, "position_offset=-1"),
    ({"position_offset": 2, "is_decoder": True}, "position_offset=2 .*decoder"),
    ({"position_offset": 2, "position_embedding_type": "rope"}, "position_offset=2 .*'rope'"),
    ({"position_offset": 64, "max_position_embeddings": 64}, "position_offset=64 .*max_position_embeddings=64"),
])
def test_bad_options_are_refused_when_the_config_is_built(overrides, allowed):
    with pytest.raises(ValueError, match=allowed):
        XArchConfig(**overrides)
