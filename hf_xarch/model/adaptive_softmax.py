"""Adaptive softmax output layer for causal LMs (Grave et al. 2017, "Efficient softmax approximation for GPUs").

The vocabulary, sorted by frequency, is split by ``adaptive_cutoffs`` into a shortlist and tail clusters. The head
scores the shortlist plus one entry per cluster; a token in cluster ``i`` gets
``log p(cluster i) + log p(token | cluster i)``, and cluster ``i``'s scorer works in a space ``div_value**(i+1)``
times narrower. With Zipfian text most tokens stay in the shortlist, so training touches a small part of the V-way
output. ``torch.nn.AdaptiveLogSoftmaxWithLoss`` does the arithmetic; this file adapts it to a causal LM:

* ``causal_lm_loss`` is the fast path: each labelled position is scored only in its own cluster;
* ``log_probs`` is the full distribution (every cluster for every position), used for evaluation and ``generate()``,
  which is also the plain reference: the loss equals the cross-entropy of ``log_probs`` (tests hold one to the other).

This file travels to the Hub with a saved model, so it imports only torch (the README's "Sharing models").
"""

from __future__ import annotations

import torch
from torch import nn


class AdaptiveSoftmaxHead(nn.AdaptiveLogSoftmaxWithLoss):
    """``AdaptiveLogSoftmaxWithLoss`` over the (possibly factorized, ``embedding_size``-wide) output features."""

    def __init__(self, config):
        super().__init__(
            in_features=config.embedding_size,
            n_classes=config.vocab_size,
            cutoffs=list(config.adaptive_cutoffs),
            div_value=float(config.adaptive_div_value),
            head_bias=False,
        )

    def log_probs(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., embedding_size) -> (..., vocab_size) log-probabilities of the full distribution."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.log_prob(flat).view(*hidden_states.shape[:-1], self.n_classes)

    def causal_lm_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Next-token negative log-likelihood with transformers' ``ForCausalLMLoss`` conventions: labels are shifted
        here (or given already shifted as ``shift_labels``), ``ignore_index`` positions do not count, and the sum is
        divided by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation), else by the number of
        labelled positions."""
        if shift_labels is None:
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden_states.device)
        keep = targets != ignore_index
        kept_targets = targets[keep]
        if kept_targets.numel() and (int(kept_targets.min()) < 0 or int(kept_targets.max()) >= self.n_classes):
            bad = int(kept_targets.max()) if int(kept_targets.max()) >= self.n_classes else int(kept_targets.min())
            raise ValueError(
                f"labels hold token id {bad}, outside the vocabulary (ids 0..{self.n_classes - 1}, or "
                f"{ignore_index} to ignore a position)"
            )
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])[keep]
        target_log_probs = self(flat, kept_targets).output
        if num_items_in_batch is None:
            return -target_log_probs.sum() / keep.sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(target_log_probs.device)
        return -target_log_probs.sum() / num_items_in_batch


__all__ = ["AdaptiveSoftmaxHead"]
