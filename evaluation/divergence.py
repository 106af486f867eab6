"""Scoring a pruned model's next-token distribution against the unpruned model's, position by position.

For each scored position this gives, besides the NLL of the target
(bit-equal to evaluation.perplexity.token_nll), the KL divergence
KL(original || pruned) over the full vocabulary and whether both models'
top-1 tokens agree: how far pruning moves the whole distribution, not only
the probability of the one observed token (the KL term is the one
distillation and quantization work report beside perplexity; e.g. Hinton et
al., 2015, "Distilling the knowledge in a neural network").

The original's side of a chunk of rows is its ``Reference``: the probability
slices, the negative entropy and the top-1 token of each row, kept while the
engine scores the other configurations of the same window batch. Memory: one
float32 (float64 for a float64 model) entry per scored position and
vocabulary entry of one window batch, e.g. 4 x 1024 x 50,257 x 4 bytes = 823
MB for four GPT-2 windows of 1024 scored tokens, 103 MB for one sliding
window of stride 512; plus the pruned logits of one chunk of LOGIT_ROWS rows.

KL = sum_v p(v) (log p(v) - log q(v)) is computed as the original's negative
entropy minus its cross entropy with the pruned log-probabilities, each summed
slice by slice in the same order, so a configuration whose logits equal the
original's bit for bit (an identity block removed) gets exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from evaluation.perplexity import upcast, logit_slices, slices_nll

Slices = list[tuple[int, torch.Tensor]]


@dataclass(frozen=True)
class Reference:
    """The original model's distribution at a chunk of scored positions."""

    probs: list[torch.Tensor]  # per vocabulary slice, rows x slice
    neg_entropy: torch.Tensor  # sum_v p log p, per row
    top1: torch.Tensor  # argmax token, per row


def head_slices(head: nn.Module, hidden: torch.Tensor) -> Slices:
    """The logits of ``hidden`` as vocabulary slices: evaluation.perplexity's slicing for a linear head, one
    slice of everything for any other head."""
    if not isinstance(head, nn.Linear):
        return [(0, upcast(head(hidden)))]
    return list(logit_slices(head, hidden))


def slices_token_nll(head: nn.Module, slices: Slices, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL exactly as evaluation.perplexity.token_nll computes it, and each row's log-sum-exp."""
    if not isinstance(head, nn.Linear):
        logits = slices[0][1]
        return F.cross_entropy(logits, targets, reduction="none"), torch.logsumexp(logits, dim=1)
    return slices_nll(slices, targets)


def _top1(slices: Slices) -> torch.Tensor:
    """The first maximal column over all slices, per row."""
    maxima = [logits.max(dim=1) for _, logits in slices]
    which = torch.stack([m.values for m in maxima]).argmax(dim=0)  # the first slice holding the row's maximum
    local = torch.stack([m.indices + first for (first, _), m in zip(slices, maxima)])
    return local.gather(0, which.unsqueeze(0)).squeeze(0)


def _expected(probs: list[torch.Tensor], slices: Slices, lse: torch.Tensor) -> torch.Tensor:
    """sum_v p(v) log q(v) per row, q the softmax of ``slices``: one row-wise dot product per slice."""
    total = None
    for p, (_, logits) in zip(probs, slices):
        dot = torch.bmm(p.unsqueeze(1), (logits - lse.unsqueeze(1)).unsqueeze(2)).view(-1)
        total = dot if total is None else total + dot
    return total


def reference(slices: Slices, lse: torch.Tensor) -> Reference:
    """The original's side of a chunk, from its logit slices and log-sum-exps."""
    probs = [(logits - lse.unsqueeze(1)).exp() for _, logits in slices]
    return Reference(probs, _expected(probs, slices, lse), _top1(slices))


def compare(ref: Reference, slices: Slices, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(original || pruned) per row (rounding below 0 clamped) and whether the top-1 tokens agree."""
    return (ref.neg_entropy - _expected(ref.probs, slices, lse)).clamp_min(0.0), _top1(slices) == ref.top1
