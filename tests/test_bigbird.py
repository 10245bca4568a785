"""What is specific to BigBird (attention_type="bigbird"): its defining pattern (the keys each query block sees are
its plan), the plan's rules, lengths (no switch to full attention), the O(N) path, and parity with transformers'
BigBirdForMaskedLM. The family's invariants (causality, padding, reference, cached decode, save/reload...) run in
tests/test_families.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BigBirdConfig, BigBirdForMaskedLM

from hf_xarch import XArchConfig, XArchModel
from hf_xarch.convert import from_hf, to_hf
from hf_xarch.model.attention_bigbird import bigbird_block_attention, bigbird_reference, random_plan
from hf_xarch.model.attention_bigbird_spec import bigbird_attention_cost

from .helpers import random_ids, tiny_config

BLOCK, RANDOM = 3, 2


def bigbird_config(**overrides) -> XArchConfig:
    return tiny_config(**{"attention_type": "bigbird", "block_size": BLOCK, "num_random_blocks": RANDOM,
                          "num_key_value_heads": 2, "position_embedding_type": "rope", **overrides})


def planned_keys(plan, row: int, head: int, query: int, length: int, decoder: bool) -> set[int]:
    """The keys query ``query`` of a row of ``length`` real tokens sees, from the plan's definition, written out."""
    block, last = query // BLOCK, (length - 1) // BLOCK
    if decoder:
        blocks = {0, block - 1, block}
    elif block in (0, last):
        return set(range(length))
    else:
        blocks = {0, last, block - 1, block, block + 1}
    blocks |= {int(b) for b in plan[row, head, block] if b >= 0}
    keys = {key for key in range(length) if key // BLOCK in blocks}
    return {key for key in keys if key <= query} if decoder else keys


@pytest.mark.parametrize("decoder", [False, True])
def test_the_keys_each_query_block_sees_are_its_plan(decoder):
    """The block-sparse path's visible keys (read off with one-hot values: each output row is its attention weights)
    are exactly the plan's sliding, global and random blocks, per row length and head; and the dense reference
    agrees."""
    torch.manual_seed(0)
    batch, heads, length = 2, 3, 26
    lengths = torch.tensor([26, 17])
    blocks = -(-length // BLOCK)
    last = None if decoder else (lengths - 1) // BLOCK
    plan = random_plan(7, heads, blocks, last, RANDOM).expand(batch, -1, -1, -1)
    query, key = torch.randn(batch, heads, length, 8), torch.randn(batch, heads, length, 8)
    value = torch.eye(length).expand(batch, heads, length, length)
    fast = bigbird_block_attention(query, key, value, plan, BLOCK, lengths, last, 0.3)
    real = torch.arange(length)[None]
    valid = real < lengths[:, None]
    reference, _ = bigbird_reference(query, key, value, plan, BLOCK, real, real, valid, last, 0.3)
    rows = valid[:, None, :, None]  # padding queries' rows are nobody's output
    torch.testing.assert_close(fast * rows, reference.transpose(1, 2) * rows, atol=1e-6, rtol=1e-5)
    for row in range(batch):
        for head in range(heads):
            for q in range(int(lengths[row])):
                seen = set((fast[row, head, q] > 0).nonzero().flatten().tolist())
                assert seen == planned_keys(plan, row, head, q, int(lengths[row]), decoder), (row, head, q)


@pytest.mark.parametrize("decoder", [False, True])
def test_random_blocks_are_distinct_legal_and_as_many_as_allowed(decoder):
    heads, blocks, random = 4, 12, 3
    last = None if decoder else torch.tensor([11, 6, 3])
    plan = random_plan(3, heads, blocks, last, random)
    for row in range(plan.shape[0]):
        for head in range(heads):
            for i in range(blocks):
                drawn = [int(b) for b in plan[row, head, i] if b >= 0]
                if decoder:
                    legal = set(range(1, i - 1))
                elif 1 <= i < int(last[row]):
                    legal = {j for j in range(1, int(last[row])) if abs(j - i) > 1}
                else:
                    legal = set()
                assert len(set(drawn)) == len(drawn) == min(random, len(legal)) and set(drawn) <= legal
    assert not torch.equal(plan[:, 0], plan[:, 1])  # each head has its own draw


def test_decoder_plan_of_a_block_never_depends_on_later_blocks():
    """What lets cached decoding see the plan of the full forward: a block's draw is the same at any length."""
    short, long = random_plan(5, 2, 6, None, 2), random_plan(5, 2, 15, None, 2)
    assert torch.equal(short, long[:, :, :6])


def test_global_tokens_on_the_block_path_equal_the_reference():
    model = XArchModel(bigbird_config()).eval()
    ids, mask = random_ids(2, 23, seed=1), torch.ones(2, 23, dtype=torch.long)
    mask[1, 17:] = 0
    flags = torch.zeros_like(ids)
    flags[0, 9], flags[1, 4], flags[1, 12] = 1, 1, 1
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, global_attention_mask=flags).last_hidden_state
        model.set_attn_implementation("eager")
        reference = model(ids, attention_mask=mask, global_attention_mask=flags).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(fast[real], reference[real], atol=1e-5, rtol=1e-5)


def test_short_inputs_are_the_definition_and_nothing_sticks():
    """One or two blocks: every block is global, which is full attention (the definition, not a fallback); a longer
    input afterwards is block-sparse again (transformers' BigBird stays switched to full attention, #20031)."""
    config = bigbird_config(position_embedding_type="learned")
    model = XArchModel(config).eval()
    full = XArchModel(tiny_config(position_embedding_type="learned", num_key_value_heads=2)).eval()
    full.load_state_dict(model.state_dict())
    short, long = random_ids(1, 2 * BLOCK, seed=2), random_ids(1, 30, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(short).last_hidden_state, full(short).last_hidden_state)
        sparse = model(long).last_hidden_state
        assert (sparse - full(long).last_hidden_state).abs().max() > 1e-3
        model.set_attn_implementation("eager")
        torch.testing.assert_close(sparse, model(long).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_the_plan_is_fixed_in_training_unless_a_redraw_is_asked():
    ids = random_ids(1, 30, seed=4)
    outputs = {}
    for redraw in (False, True):
        torch.manual_seed(0)
        model = XArchModel(bigbird_config(bigbird_redraw_random=redraw)).train()
        with torch.no_grad():
            outputs[redraw] = [model(ids).last_hidden_state for _ in range(2)]
            evals = [model.eval()(ids).last_hidden_state for _ in range(2)]
        torch.testing.assert_close(evals[0], evals[1], atol=0, rtol=0)  # eval: always the fixed plan
    torch.testing.assert_close(outputs[False][0], outputs[False][1], atol=0, rtol=0)
    assert (outputs[True][0] - outputs[True][1]).abs().max() > 1e-4


@pytest.mark.parametrize(("field", "value", "decoder"), [
    ("block_size", 0, False),
    ("block_size", 2.5, False),
    ("num_random_blocks", -1, False),
    ("num_random_blocks", True, False),
    ("bigbird_random_plan", "numpy", False),
    ("bigbird_random_plan", "transformers", True),
    ("bigbird_redraw_random", "yes", False),
])
def test_bad_options_name_the_field(field, value, decoder):
    with pytest.raises(ValueError, match=f"XArchConfig.{field}="):
        bigbird_config(**{field: value}, is_decoder=decoder)


def test_options_are_refused_without_bigbird_layers():
    with pytest.raises(ValueError, match="block_size=16 is not allowed.*bigbird"):
        tiny_config(block_size=16)


class LargestTensor(TorchDispatchMode):
    """The most elements any op's output has."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("decoder", [False, True])
def test_the_block_path_makes_no_sequence_squared_tensor(decoder):
    length, heads, size = 1024, 2, 16
    config = tiny_config(attention_type="bigbird", block_size=size, num_random_blocks=1, num_attention_heads=heads,
                         num_hidden_layers=1, max_position_embeddings=length, is_decoder=decoder)
    model = XArchModel(config).eval()
    ids, mask = random_ids(1, length, seed=5), torch.ones(1, length, dtype=torch.long)
    mask[0, :7] = 0  # padding: the compacted path
    with torch.no_grad(), LargestTensor() as watch:
        model(ids, attention_mask=mask, use_cache=False)
    assert watch.largest < length * length // 4  # the score tiles: heads x N x (5 + r) x block_size


def test_cost_per_token_stays_flat_with_length():
    config = bigbird_config(block_size=64, num_random_blocks=3, max_position_embeddings=32768)
    per_token = [bigbird_attention_cost(config, 0, n).forward_flops for n in (4096, 16384)]
    assert per_token[1] < 1.1 * per_token[0]  # full attention's grows 4x


# ---- parity with transformers' BigBird ------------------------------------------------------------------------------
def big_bird(attention_type="block_sparse", **overrides) -> BigBirdForMaskedLM:
    torch.manual_seed(0)
    config = BigBirdConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=128, block_size=4, num_random_blocks=2,
                           hidden_act="gelu", attention_type=attention_type, **overrides)
    return BigBirdForMaskedLM(config).eval()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_big_bird_masked_lm_converts_exactly(implementation):
    """At lengths above (5 + 2r)·block_size = 36 (where transformers' block-sparse path runs), a multiple of the
    block or not (transformers pads to one), in eval mode."""
    hf = big_bird()
    model = from_hf(hf).eval()
    model.set_attn_implementation(implementation)
    assert (model.config.attention_type, model.config.block_size, model.config.num_random_blocks) == ("bigbird", 4, 2)
    for length in (40, 45, 64):
        ids = random_ids(2, length, seed=length, low=3)
        with torch.no_grad():
            expected, got = hf(ids).logits, model(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # a padded row: transformers' blocks follow the batch (its last global block is padding for this row), XArch's the
    # row's real tokens, which is transformers on the row alone
    ids, mask = random_ids(2, 64, seed=7, low=3), torch.ones(2, 64, dtype=torch.long)
    mask[1, 45:] = 0
    with torch.no_grad():
        alone, got = hf(ids[1:, :45]).logits, model(ids, attention_mask=mask).logits[1:, :45]
    torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)


def test_big_bird_round_trip_and_full_attention():
    hf = big_bird()
    back = to_hf(from_hf(hf), "BigBirdForMaskedLM").eval()
    assert back.config.attention_type == "block_sparse" and back.config.block_size == 4
    ids = random_ids(1, 48, seed=6, low=3)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    full = big_bird("original_full")
    model = from_hf(full).eval()
    assert model.config.attention_type == "full"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, full(ids).logits, atol=1e-4, rtol=1e-4)


def test_big_bird_options_that_do_not_convert_are_named():
    with pytest.raises(ValueError, match="rescale_embeddings"):
        from_hf(big_bird(rescale_embeddings=True))
    model = XArchModel(bigbird_config(num_key_value_heads=4, position_embedding_type="learned"))
    with pytest.raises(ValueError, match="bigbird_random_plan='seeded'"):
        to_hf(model, "BigBirdModel")
