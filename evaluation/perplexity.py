"""Perplexity of a token stream, window by window.

The windows come from evaluation.windows (the conventions of the field:
sliding as in the transformers guide, disjoint, lm-eval's rolling windows,
each optionally after BOS); each window scores some of its tokens given the
tokens before them. PPL = exp(total NLL / scored tokens), summed in float64.

The LM head runs only on the positions that are scored, a block of rows and
a slice of the vocabulary at a time, so a window batch never materializes
logits for its context-only positions nor a full rows x vocabulary matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from models.placement import input_device, weights_at_hand
from utils.log import progress_bar

from evaluation.windows import (DEFAULT_PROTOCOL, Window, make_windows, sliding_windows,  # noqa: F401 (re-exported)
                                window_batches)
from models.families import SoftCappedHead, lm_head, soft_cap

# Rows of hidden states sent through the LM head at once.
LOGIT_ROWS = 1024
# Vocabulary entries per slice of the LM head on a CPU, where writing and
# re-reading a 1024 x 50257 logits matrix (206 MB) costs more than the matmul
# that makes it: slices of 4096 (16 MB) took GPT-2's head plus loss from about
# 91 to 135 GFLOP/s on the 2-core development machine. Accelerators, which
# this was not measured on, take the whole vocabulary at once.
VOCAB_SLICE = 4096


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int


def batch_inputs(ids: torch.Tensor, batch: Sequence[Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids (B, T), the (row, position) of every scored prediction, and its target id."""
    inputs = torch.stack([window_ids(ids, w) for w in batch])
    rows, positions, targets = [], [], []
    for row, w in enumerate(batch):
        rows.append(torch.full((w.scored,), row, dtype=torch.long))
        # the hidden state at position p predicts the token fed at p + 1
        first = w.position(w.first_target)
        positions.append(torch.arange(first, first + w.scored))
        targets.append(ids[w.first_target : w.stop])
    return inputs, torch.cat(rows), torch.cat(positions), torch.cat(targets)


def window_ids(ids: torch.Tensor, w: Window) -> torch.Tensor:
    """The token ids fed to the model for window ``w``: its prefix token, if any, then its text."""
    text = ids[w.begin : w.end]
    if w.prefix is None:
        return text
    return torch.cat([torch.tensor([w.prefix], dtype=ids.dtype), text])


def scored_nll(head: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
               targets: torch.Tensor) -> float:
    """Sum of next-token NLL at the scored positions of final hidden states.

    ``hidden`` is (B, T, D) after the final layer norm; ``head`` maps it to
    logits. Cross-entropy runs in float32 even for half-precision models.
    """
    total = 0.0
    with weights_at_hand(head) as device:  # under --device-map the head's weight may be offloaded
        hidden = hidden.to(device)
        picked = hidden[rows.to(device), positions.to(device)]
        targets = targets.to(device)
        for start in range(0, picked.shape[0], LOGIT_ROWS):
            nll = token_nll(head, picked[start : start + LOGIT_ROWS], targets[start : start + LOGIT_ROWS])
            total += nll.double().sum().item()
    return total


def token_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
              vocab_slice: int | None = None) -> torch.Tensor:
    """-log softmax(head(hidden))[target] per row, in float32 (float64 for a float64 model), one
    vocabulary slice at a time.

    The log-sum-exp over the vocabulary is the log-sum-exp of the slices'
    log-sum-exps, so slicing changes nothing but rounding. A head that is not
    a plain linear layer (or a soft-capped one) is applied whole.
    """
    linear = head.linear if isinstance(head, SoftCappedHead) else head
    if not isinstance(linear, nn.Linear):
        return F.cross_entropy(upcast(head(hidden)), targets, reduction="none")
    return slices_nll(logit_slices(head, hidden, vocab_slice), targets)[0]


def logit_slices(head: nn.Module, hidden: torch.Tensor, vocab_slice: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first vocabulary index, upcast logits) of each vocabulary slice of a linear head, computed as they are
    read; a soft cap (models.families.SoftCappedHead) acts on each logit alone, so it is applied slice by slice."""
    cap = None
    if isinstance(head, SoftCappedHead):
        head, cap = head.linear, head.cap
    if vocab_slice is None:
        vocab_slice = VOCAB_SLICE if hidden.device.type == "cpu" else head.out_features
    for first in range(0, head.out_features, vocab_slice):
        last = first + vocab_slice
        bias = head.bias[first:last] if head.bias is not None else None
        logits = F.linear(hidden, head.weight[first:last], bias)
        yield first, upcast(soft_cap(logits, cap) if cap is not None else logits)


def slices_nll(slices: Iterable[tuple[int, torch.Tensor]], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL of the targets from vocabulary slices of logits, and each row's log-sum-exp."""
    sums, target_logit = [], None
    for first, logits in slices:
        if target_logit is None:
            target_logit = torch.zeros(len(targets), device=logits.device, dtype=logits.dtype)
        sums.append(torch.logsumexp(logits, dim=1))
        inside = (targets >= first) & (targets < first + logits.shape[1])
        column = (targets - first).clamp(0, logits.shape[1] - 1).unsqueeze(1)
        target_logit += torch.where(inside, logits.gather(1, column).squeeze(1), 0.0)
    lse = torch.logsumexp(torch.stack(sums), dim=0)
    return lse - target_logit, lse


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss; float32 and float64 stay as they are."""
    return t if t.dtype == torch.float64 else t.float()


def to_perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean NLL); a model so damaged that it overflows gets inf."""
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return math.inf


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The base model (ids -> final hidden states) and the LM head (soft-capped where the family caps it)."""
    return model.base_model, lm_head(model)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, max_length: int, stride: int | None, batch_size: int = 1,
               progress: bool = True, desc: str = "windows", protocol: str = DEFAULT_PROTOCOL,
               prefix_token: int | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on the token stream ``ids`` (1-D, on CPU), in the windows of
    ``protocol`` (evaluation.windows.make_windows)."""
    base, head = lm_parts(model)
    device = input_device(model)
    windows = make_windows(len(ids), max_length, stride, protocol, prefix_token)
    nll_sum, tokens = 0.0, 0
    bar = progress_bar(total=len(windows), desc=desc, unit="win", leave=False, disable=not progress)
    for batch in window_batches(windows, batch_size):
        inputs, rows, positions, targets = batch_inputs(ids, batch)
        hidden = base(input_ids=inputs.to(device), use_cache=False).last_hidden_state
        nll_sum += scored_nll(head, hidden, rows, positions, targets)
        tokens += len(targets)
        bar.update(len(batch))
    bar.close()
    return PerplexityResult(to_perplexity(nll_sum, tokens), nll_sum, tokens)
