"""Shared helpers for the tests: tiny configs in the spirit of transformers' model testers (hidden 32, vocab 99)."""

from __future__ import annotations

import torch

import hf_xarch
from hf_xarch import XArchConfig
from hf_xarch.testing import run_without_hf_xarch  # a Python in which `import hf_xarch` fails


# a family's options where the defaults would make its machinery idle on short test inputs (the kit's 13 tokens, FSDP's 16)
FAMILY_OVERRIDES = {
    "sliding_window": {"attention_window": 4},  # a band narrower than the sequence, a bounded cache
    "linear_sliding": {"linear_window": 4},  # keys outside the window, so its linear part runs too
    "bigbird": {"block_size": 2, "num_random_blocks": 2},  # 7 blocks of 13 tokens: random blocks with a choice
    "lsh": {"num_buckets": 4, "lsh_chunk_length": 4, "num_hashes": 2},  # 4 chunks of 13 tokens, 2 rounds
}


def tiny_config(**overrides) -> XArchConfig:
    """A tiny random-model config; any field can be overridden."""
    values = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
    )
    values.update(overrides)
    return XArchConfig(**values)


def random_ids(batch: int, length: int, vocab: int = 99, seed: int | None = None, low: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randint(low, vocab, (batch, length), generator=generator)


def left_padded_mask(lengths: list[int], total: int) -> torch.Tensor:
    """A (batch, total) mask with `lengths[i]` real tokens at the right end of row i."""
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, total - length :] = 1
    return mask


__all__ = ["tiny_config", "random_ids", "left_padded_mask", "run_without_hf_xarch", "hf_xarch"]


def assisted_and_greedy(config: XArchConfig, monkeypatch, new_tokens: int = 30):
    """Greedy generation with and without a different random assistant (``generate(assistant_model=...)``), and the
    number of draft tokens the assisted run took back through ``Cache.crop``: (assisted, greedy, taken_back)."""
    from transformers.cache_utils import Cache

    from hf_xarch import XArchForCausalLM

    removed = []
    crop = Cache.crop
    monkeypatch.setattr(Cache, "crop", lambda self, tokens: (removed.append(-tokens), crop(self, tokens))[1])
    torch.manual_seed(7)
    model, assistant = XArchForCausalLM(config).eval(), XArchForCausalLM(config).eval()
    prompt = random_ids(1, 6, seed=32)
    greedy = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    removed.clear()
    assisted = model.generate(prompt, assistant_model=assistant, max_new_tokens=new_tokens, do_sample=False)
    return assisted, greedy, sum(removed)
