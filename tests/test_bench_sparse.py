"""What the numbers of ``benchmarks/bench_sparse.py`` rest on: the family swap keeps the trained weights, and only
peers that cannot run are skipped."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_sparse import LAYERS, MODELS, skip_reason, with_attention

from hf_xarch import XArchForMaskedLM

from .helpers import tiny_config


def tiny_model():
    torch.manual_seed(0)
    return XArchForMaskedLM(tiny_config(attention_type="bigbird", block_size=4, num_random_blocks=1)).eval()


def test_swap_to_full_keeps_every_weight():
    model = tiny_model()
    swapped, dropped, added = with_attention(model, attention_type="full")
    assert (dropped, added) == ([], [])
    assert swapped.config.attention_type == "full" and not swapped.training
    for key, value in model.state_dict().items():
        assert torch.equal(swapped.state_dict()[key], value), key


def test_swap_to_lsh_drops_only_the_key_projection():
    model = tiny_model()
    swapped, dropped, _ = with_attention(model, attention_type="lsh", num_buckets=4, lsh_chunk_length=8)
    assert dropped and all(".k_proj." in key for key in dropped)
    kept = swapped.state_dict()
    for key, value in model.state_dict().items():
        if key not in dropped:
            assert torch.equal(kept[key], value), key


def test_only_transformers_bigbird_is_skipped_and_only_at_long_lengths():
    for part, candidates in (("layer", LAYERS), ("model", MODELS)):
        assert skip_reason(part, "bigbird_hf", 4096) is None
        assert "N x N" in skip_reason(part, "bigbird_hf", 16384)
        assert all(skip_reason(part, name, 16384) is None for name in candidates if name != "bigbird_hf")
