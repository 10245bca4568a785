"""Held-out evaluation scores what it says it scores: every block, or a seeded uniform random sample of a stated size,
never the first blocks in document order; the classifier metrics likewise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from hf_xarch.metrics import load_metric
from hf_xarch.train.evaluation import evaluate_classifier, evaluate_lm, format_scores, sample_rows

ROWS, LENGTH, BATCH = 40, 8, 4


class _IdsAreLosses(torch.nn.Module):
    """A stand-in language model whose loss on a batch is the mean of the token ids it predicts, so a block filled
    with the id i has loss i, and a mean over any set of blocks says exactly which blocks were scored."""

    def forward(self, input_ids, labels):
        return SimpleNamespace(loss=labels[:, 1:].double().mean())


def _blocks_by_position() -> torch.Tensor:
    # block i holds i: losses rise along the document order, as they can in real held-out text
    return torch.arange(ROWS)[:, None].expand(ROWS, LENGTH).contiguous()


def test_whole_heldout_set_is_the_mean_over_every_block():
    metrics = evaluate_lm(Accelerator(cpu=True), _IdsAreLosses(), _blocks_by_position(), BATCH, bytes_per_token=2.5)
    assert metrics["eval/loss"] == pytest.approx((ROWS - 1) / 2)
    assert metrics["eval/blocks"] == metrics["eval/heldout_blocks"] == ROWS
    assert metrics["eval/tokens"] == ROWS * (LENGTH - 1)  # predicted tokens: the first of each block is not
    assert metrics["eval/bytes"] == round(ROWS * (LENGTH - 1) * 2.5)
    assert metrics["eval/coverage"].startswith("the whole held-out set: 40 blocks")
    assert "eval/sample_seed" not in metrics


@pytest.mark.parametrize("seed", [0, 5])
def test_a_limited_evaluation_is_a_stated_random_sample_not_the_first_blocks(seed):
    blocks = _blocks_by_position()
    metrics = evaluate_lm(Accelerator(cpu=True), _IdsAreLosses(), blocks, BATCH, max_batches=2, sample_seed=seed)
    chosen = sample_rows(ROWS, 2 * BATCH, seed)
    assert metrics["eval/loss"] == pytest.approx(blocks[chosen, 1:].double().mean().item())
    assert metrics["eval/loss"] != pytest.approx((2 * BATCH - 1) / 2)  # what the first 8 blocks would give
    assert metrics["eval/blocks"] == 2 * BATCH and metrics["eval/heldout_blocks"] == ROWS
    assert metrics["eval/sample_seed"] == seed and metrics["eval/tokens"] == 2 * BATCH * (LENGTH - 1)
    assert f"random sample (uniform, seed {seed}) of 8 of the 40 held-out blocks" in metrics["eval/coverage"]
    assert format_scores(metrics).endswith(f"(on {metrics['eval/coverage']})")


def test_sample_rows_are_uniform_over_the_whole_set():
    assert sample_rows(ROWS, None, 0) is None and sample_rows(ROWS, ROWS, 0) is None  # covers everything: all rows
    draws = torch.stack([sample_rows(ROWS, 8, seed) for seed in range(400)])
    assert all(len(set(row.tolist())) == 8 for row in draws)  # without replacement
    counts = torch.bincount(draws.flatten(), minlength=ROWS).double()
    # each row is drawn 400 x 8 / 40 = 80 times on average; the last rows as often as the first
    assert counts.min() > 40 and counts.max() < 130
    assert counts[: ROWS // 2].sum() == pytest.approx(counts[ROWS // 2 :].sum(), rel=0.1)
    assert torch.equal(sample_rows(ROWS, 8, 3), sample_rows(ROWS, 8, 3))  # seeded: every evaluation the same rows


class _AlwaysClassOne(torch.nn.Module):
    """Predicts class 1 for every example: accuracy is the share of examples labelled 1."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = torch.tensor([[0.0, 1.0]]).expand(len(input_ids), 2)
        return SimpleNamespace(logits=logits, loss=torch.tensor(0.0))


def test_classifier_metrics_cover_a_stated_sample_not_the_first_examples():
    # the first 20 examples are labelled 1, the last 20 are labelled 0: the first examples would score accuracy 1.0
    examples = [{"input_ids": [5, 6, 7], "labels": int(i < 20)} for i in range(ROWS)]
    metrics = {"accuracy": load_metric("accuracy"), "f1": load_metric("f1")}
    whole = evaluate_classifier(Accelerator(cpu=True), _AlwaysClassOne(), examples, BATCH, 0, "sequence", metrics, 2)
    assert whole["eval/accuracy"] == pytest.approx(0.5)
    assert whole["eval/examples"] == whole["eval/heldout_examples"] == ROWS
    assert whole["eval/coverage"] == "the whole held-out set: 40 examples"
    sampled = evaluate_classifier(Accelerator(cpu=True), _AlwaysClassOne(), examples, BATCH, 0, "sequence",
                                  metrics, 2, max_batches=2)
    chosen = sample_rows(ROWS, 2 * BATCH, 0)
    assert sampled["eval/accuracy"] == pytest.approx((chosen < 20).double().mean().item())
    assert sampled["eval/examples"] == 8 and "random sample (uniform, seed 0) of 8 of the 40" in sampled["eval/coverage"]
