"""Embeddings for large vocabularies: factorized and tied embeddings (resizing, LoRA), ALBERT's cross-layer sharing
(against an unshared model holding copies of the shared weights, with the cache and gradient checkpointing), and the
adaptive-softmax output (its loss against the cross-entropy of its full log-probabilities, generate())."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_xarch import ATTENTION_FAMILIES, XArchConfig, XArchForCausalLM, XArchForMaskedLM, XArchModel

from .helpers import left_padded_mask, random_ids, run_without_hf_xarch, tiny_config

V, H = 99, 32


def build(model_class, **overrides):
    config = tiny_config(initializer_range=0.2, **overrides)  # outputs far from uniform
    return model_class(config).eval()


def adaptive_config(**overrides):
    values = dict(
        is_decoder=True, output_layer="adaptive", adaptive_cutoffs=[7, 30, 60], adaptive_div_value=2.0,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return values


# ---- factorized and tied embeddings --------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("model_class", [XArchForCausalLM, XArchForMaskedLM])
def test_factorized_embeddings_tied_and_untied(model_class, tie, tmp_path):
    E = 8
    model = build(model_class, embedding_size=E, tie_word_embeddings=tie, is_decoder=model_class is XArchForCausalLM)
    word, output = model.get_input_embeddings(), model.get_output_embeddings()
    assert word.weight.shape == (V, E) and output.weight.shape == (V, E)
    assert model.model.embeddings.projection.weight.shape == (H, E)
    assert (word.weight.data_ptr() == output.weight.data_ptr()) == tie
    # ALBERT's saving: V·E + E·H (+ E·V untied) instead of V·H (+ H·V untied)
    params = {name: p.numel() for name, p in model.named_parameters()}
    assert params["model.embeddings.word_embeddings.weight"] + params["model.embeddings.projection.weight"] == V * E + E * H
    assert ("lm_head.weight" in params or "lm_head.decoder.weight" in params) == (not tie)

    ids = random_ids(2, 7, seed=3)
    labels = ids.clone()
    labels[:, ::2] = -100
    model.train()
    model(ids, labels=labels).loss.backward()
    assert word.weight.grad is not None and word.weight.grad.abs().sum() > 0
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert (loaded.get_input_embeddings().weight.data_ptr() == loaded.get_output_embeddings().weight.data_ptr()) == tie


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("model_class", [XArchForCausalLM, XArchForMaskedLM])
def test_resize_token_embeddings_factorized(model_class, tie):
    E, extra = 8, 6
    model = build(model_class, embedding_size=E, tie_word_embeddings=tie, is_decoder=model_class is XArchForCausalLM)
    ids = random_ids(2, 6, seed=4)
    before = model(ids).logits
    model.resize_token_embeddings(V + extra)
    assert model.config.vocab_size == V + extra
    word, output = model.get_input_embeddings(), model.get_output_embeddings()
    assert word.weight.shape == (V + extra, E) and output.weight.shape == (V + extra, E)
    assert (word.weight.data_ptr() == output.weight.data_ptr()) == tie
    if model_class is XArchForMaskedLM:
        assert output.bias.shape == (V + extra,)
    after = model(ids).logits
    assert after.shape == (2, 6, V + extra)
    torch.testing.assert_close(after[..., :V], before)  # old tokens keep their scores
    new_ids = torch.tensor([[V + extra - 1, V, 5]])
    assert model(new_ids).logits.shape == (1, 3, V + extra)


@pytest.mark.parametrize("model_class", [XArchForCausalLM, XArchForMaskedLM])
def test_lora_on_factorized_embeddings(model_class):
    base = build(model_class, embedding_size=8, is_decoder=model_class is XArchForCausalLM)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "projection"]  # `projection`: the factorized E -> H map
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    adapted = {name.rsplit(".", 2)[-2] for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    assert adapted == set(targets)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    ids = random_ids(2, 7, seed=5)
    peft_model.eval()
    initial = peft_model(input_ids=ids).logits.detach()  # LoRA's B starts at zero: the base model's output
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    peft_model.eval()
    adapted_logits = peft_model(input_ids=ids).logits
    assert not torch.allclose(adapted_logits, initial)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, adapted_logits, atol=1e-5, rtol=1e-5)


# ---- cross-layer sharing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("albert_layers, groups, inner", [(4, 1, 1), (4, 2, 1), (6, 3, 2), (6, 1, 3), (8, 4, 2), (3, 3, 1)])
def test_block_schedule_is_albert_order(albert_layers, groups, inner):
    # AlbertTransformer.forward: layer i applies every layer of group int(i / (L / G)), in order
    expected = []
    for i in range(albert_layers):
        group = int(i / (albert_layers / groups))
        expected += [group * inner + k for k in range(inner)]
    config = tiny_config(num_hidden_layers=albert_layers * inner, num_hidden_groups=groups, inner_group_num=inner)
    assert config.block_schedule() == expected
    model = XArchModel(config)
    assert len(model.layers) == groups * inner


def unshared_copy(shared):
    """The same function without sharing: layer i holds a copy of the block shared model's layer i applies."""
    config = XArchConfig.from_dict({**shared.config.to_dict(), "num_hidden_groups": None, "inner_group_num": None})
    config._attn_implementation = shared.config._attn_implementation
    unshared = type(shared)(config).eval()
    state = {}
    for name, tensor in shared.state_dict().items():
        if name.startswith("model.layers."):
            block, rest = name[len("model.layers."):].split(".", 1)
            for layer, used in enumerate(shared.model.block_schedule):
                if used == int(block):
                    state[f"model.layers.{layer}.{rest}"] = tensor
        else:
            state[name] = tensor
    unshared.load_state_dict(state, strict=True)
    return unshared


SHARINGS = [
    dict(num_hidden_layers=4, num_hidden_groups=1),
    dict(num_hidden_layers=4, num_hidden_groups=2),
    dict(num_hidden_layers=4, num_hidden_groups=1, inner_group_num=2),
    dict(num_hidden_layers=8, num_hidden_groups=2, inner_group_num=2),
]


@pytest.mark.parametrize("sharing", SHARINGS, ids=str)
@pytest.mark.parametrize("model_class", [XArchForCausalLM, XArchForMaskedLM])
def test_shared_model_equals_unshared_copies(model_class, sharing):
    torch.manual_seed(11)
    shared = build(model_class, is_decoder=model_class is XArchForCausalLM, **sharing)
    unshared = unshared_copy(shared)
    assert shared.num_parameters() < unshared.num_parameters()
    ids = random_ids(3, 9, seed=12)
    mask = left_padded_mask([9, 6, 3], 9) if model_class is XArchForCausalLM else left_padded_mask([9, 6, 3], 9).flip(1)
    out_shared = shared(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    out_plain = unshared(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(out_shared.logits[real], out_plain.logits[real])
    # one per application of a block, plus the embeddings
    assert len(out_shared.hidden_states) == sharing["num_hidden_layers"] + 1
    for a, b in zip(out_shared.hidden_states, out_plain.hidden_states):
        torch.testing.assert_close(a[real], b[real])
    # a shared weight's gradient is the sum of its copies' gradients
    out_shared.loss.backward()
    out_plain.loss.backward()
    plain_grads = dict(unshared.named_parameters())
    for name, param in shared.named_parameters():
        if not name.startswith("model.layers."):
            torch.testing.assert_close(param.grad, plain_grads[name].grad, atol=1e-5, rtol=1e-4)
            continue
        block, rest = name[len("model.layers."):].split(".", 1)
        copies = [layer for layer, used in enumerate(shared.model.block_schedule) if used == int(block)]
        total = sum(plain_grads[f"model.layers.{layer}.{rest}"].grad for layer in copies)
        torch.testing.assert_close(param.grad, total, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_blocks_record_one_attention_map_per_application():
    shared = build(XArchModel, num_hidden_layers=4, num_hidden_groups=1, inner_group_num=2)
    shared.config._attn_implementation = "eager"
    unshared = XArchModel(XArchConfig.from_dict({**shared.config.to_dict(), "num_hidden_groups": None})).eval()
    unshared.config._attn_implementation = "eager"
    for layer, block in enumerate(shared.block_schedule):
        unshared.layers[layer].load_state_dict(shared.layers[block].state_dict())
    unshared.embeddings.load_state_dict(shared.embeddings.state_dict())
    unshared.norm.load_state_dict(shared.norm.state_dict())
    ids = random_ids(2, 6, seed=17)
    a, b = shared(ids, output_attentions=True), unshared(ids, output_attentions=True)
    assert len(a.attentions) == len(b.attentions) == 4
    for x, y in zip(a.attentions, b.attentions):
        torch.testing.assert_close(x, y)


CAUSAL_FAMILIES = sorted(name for name, family in ATTENTION_FAMILIES.items() if family.causal)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
@pytest.mark.parametrize("sharing", [SHARINGS[0], SHARINGS[2]], ids=str)
def test_shared_blocks_cached_decode_equals_full_forward(family, sharing):
    torch.manual_seed(13)
    model = build(XArchForCausalLM, is_decoder=True, attention_type=family, position_embedding_type="rope", **sharing)
    ids = random_ids(2, 8, seed=14)
    mask = left_padded_mask([8, 5], 8)
    full = model(ids, attention_mask=mask).logits
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :3], attention_mask=mask[:, :3], cache=cache, use_cache=True)
    steps = [out.logits]
    for t in range(3, 8):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-5)
    assert len(out.cache.layers) == sharing["num_hidden_layers"]  # one per application, not per distinct block


def test_shared_blocks_generate_with_and_without_cache():
    model = build(XArchForCausalLM, num_hidden_layers=4, num_hidden_groups=1, inner_group_num=2, is_decoder=True)
    ids = random_ids(2, 5, seed=15)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    torch.testing.assert_close(cached, uncached)


def test_shared_blocks_gradient_checkpointing_gives_the_same_gradients():
    model = build(XArchForCausalLM, num_hidden_layers=4, num_hidden_groups=1, inner_group_num=2, is_decoder=True)
    model.train()
    ids = random_ids(2, 9, seed=16)
    model(ids, labels=ids).loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_shared_blocks_with_two_families():
    other = [name for name, family in ATTENTION_FAMILIES.items() if name != "full" and family.bidirectional]
    if not other:
        pytest.skip("only one attention family is registered")
    types = ["full", other[0]] * 2
    # inner_group_num=2, one group: blocks (full, other) applied twice
    model = XArchModel(tiny_config(num_hidden_layers=4, layer_types=types, num_hidden_groups=1, inner_group_num=2))
    assert [type(block.attention).family.name for block in model.layers] == ["full", other[0]]
    assert model(random_ids(2, 5)).last_hidden_state.shape == (2, 5, H)
    with pytest.raises(ValueError, match="layer_types"):
        tiny_config(num_hidden_layers=4, layer_types=types, num_hidden_groups=1, inner_group_num=1)


@pytest.mark.skipif("sliding_window" not in ATTENTION_FAMILIES, reason="needs per-layer attention windows")
def test_shared_blocks_need_one_window():
    sliding = dict(num_hidden_layers=4, num_hidden_groups=2, attention_type="sliding_window")
    model = XArchModel(tiny_config(**sliding, attention_window=[4, 4, 8, 8]))
    assert [block.attention.window for block in model.layers] == [4, 8]
    with pytest.raises(ValueError, match="XArchConfig.attention_window="):
        tiny_config(**sliding, attention_window=[4, 8, 8, 8])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_hidden_groups=0), "num_hidden_groups"),
        (dict(num_hidden_groups=True), "num_hidden_groups"),
        (dict(inner_group_num=-1), "inner_group_num"),
        (dict(inner_group_num="2"), "inner_group_num"),
        (dict(num_hidden_layers=6, num_hidden_groups=4), "num_hidden_layers"),
        (dict(num_hidden_layers=6, num_hidden_groups=2, inner_group_num=2), "num_hidden_layers"),
        (dict(num_hidden_layers=3, inner_group_num=2), "num_hidden_layers"),
    ],
)
def test_bad_sharing_raises_value_error(overrides, field):
    with pytest.raises(ValueError, match=f"XArchConfig.{field}="):
        tiny_config(**overrides)


# ---- adaptive softmax ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [21, 22])
@pytest.mark.parametrize("embedding_size", [32, 12])
def test_adaptive_loss_equals_cross_entropy_of_log_probs(seed, embedding_size):
    """Fast path (each labelled token scored in its own cluster) == plain reference (full log-probabilities through
    transformers' ForCausalLMLoss), values and gradients, with ignored positions and padding."""
    torch.manual_seed(seed)
    model = build(XArchForCausalLM, **adaptive_config(embedding_size=embedding_size))
    ids = random_ids(3, 11, seed=seed)
    labels = ids.clone()
    labels[0, :4] = -100  # e.g. a prompt
    labels[2, -3:] = -100  # e.g. padding
    model.train()
    out = model(ids, labels=labels)
    assert out.logits is None  # a training step with labels skips the V-wide output
    out.loss.backward()
    fast_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    log_probs = model.eval()(ids).logits
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(3, 11), atol=1e-5, rtol=0)
    reference = ForCausalLMLoss(log_probs, labels, vocab_size=V)
    torch.testing.assert_close(out.loss, reference)
    reference.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, fast_grads[name], atol=1e-6, rtol=1e-4, msg=name)

    # the Trainer's gradient-accumulation normaliser and pre-shifted labels follow ForCausalLMLoss too
    with torch.no_grad():
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
        torch.testing.assert_close(summed, ForCausalLMLoss(log_probs, labels, V, num_items_in_batch=torch.tensor(7)))
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        torch.testing.assert_close(model(ids, labels=labels, shift_labels=shifted).loss, reference)
        eval_out = model(ids, labels=labels)  # eval mode returns both
        torch.testing.assert_close(eval_out.loss, reference)
        torch.testing.assert_close(eval_out.logits, log_probs)


def test_adaptive_cached_decode_and_generate():
    model = build(XArchForCausalLM, position_embedding_type="rope", **adaptive_config(embedding_size=16))
    ids = random_ids(2, 6, seed=23)
    mask = left_padded_mask([6, 4], 6)
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :2], attention_mask=mask[:, :2], use_cache=True)
    steps = [out.logits]
    for t in range(2, 6):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=1e-5)

    # greedy generate == argmax of the log-probabilities of the full forward, token by token
    prompt = ids[:1]
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    sequence = prompt
    for _ in range(5):
        next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], 1)
    torch.testing.assert_close(generated, sequence)
    sampled = model.generate(prompt, max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20, pad_token_id=0)
    assert sampled.shape == (1, 11) and int(sampled.max()) < V


@pytest.mark.slow  # a fresh Python process (~10-30 s on a shared machine)
def test_adaptive_and_shared_model_loads_without_hf_xarch(tmp_path):
    model = build(XArchForCausalLM, num_hidden_layers=4, num_hidden_groups=1, inner_group_num=2,
                  **adaptive_config(embedding_size=16))
    model.save_pretrained(tmp_path)
    ids = random_ids(2, 5, seed=24)
    expected = model(ids).logits
    torch.save({"ids": ids, "expected": expected.detach()}, tmp_path / "check.pt")
    script = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()\n"
        f"data = torch.load({str(tmp_path / 'check.pt')!r})\n"
        "torch.testing.assert_close(m(data['ids']).logits, data['expected'])\n"
        "assert len(m.model.layers) == 2 and len(m.model.block_schedule) == 4\n"
        "print('ok')\n"
    )
    result = run_without_hf_xarch(script)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (adaptive_config(is_decoder=False), "output_layer"),
        (adaptive_config(tie_word_embeddings=True), "tie_word_embeddings"),
        (adaptive_config(adaptive_cutoffs=None), "adaptive_cutoffs"),
        (adaptive_config(adaptive_cutoffs=[]), "adaptive_cutoffs"),
        (adaptive_config(adaptive_cutoffs=[30, 7]), "adaptive_cutoffs"),
        (adaptive_config(adaptive_cutoffs=[7, 7]), "adaptive_cutoffs"),
        (adaptive_config(adaptive_cutoffs=[0, 7]), "adaptive_cutoffs"),
        (adaptive_config(adaptive_cutoffs=[7, V]), "adaptive_cutoffs"),
        (adaptive_config(adaptive_cutoffs=[7.5]), "adaptive_cutoffs"),
        (adaptive_config(adaptive_div_value=0.5), "adaptive_div_value"),
        (adaptive_config(adaptive_div_value=64.0), "adaptive_div_value"),  # 32 // 64**3 == 0: an empty tail
        (dict(adaptive_cutoffs=[7]), "adaptive_cutoffs"),
        (dict(output_layer="hierarchical"), "output_layer"),
    ],
)
def test_bad_adaptive_config_raises_value_error(overrides, field):
    with pytest.raises(ValueError, match=f"XArchConfig.{field}="):
        tiny_config(**overrides)


def test_adaptive_head_is_not_an_output_embedding():
    model = build(XArchForCausalLM, **adaptive_config())
    assert model.get_output_embeddings() is None
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        model.resize_token_embeddings(V + 4)
    with pytest.raises(ValueError, match="labels hold token id"):
        model.train()(random_ids(1, 4), labels=torch.tensor([[1, 2, V + 3, 4]]))
