"""95% intervals for perplexity and for its change against the baseline, from one pass.

A perplexity is a ratio estimate, exp(sum of NLL / scored tokens), over a
sample of text; another sample of the same kind of text would give another
number. The interval is a percentile bootstrap (Efron, 1979, "Bootstrap
methods: another look at the jackknife") over non-overlapping blocks of
consecutive scored tokens (a block bootstrap, Kunsch, 1989, "The jackknife
and the bootstrap for general stationary observations").

Why blocks of tokens, not windows or single tokens: the NLL of neighbouring
tokens is correlated (a hard passage is hard for many tokens), so resampling
single tokens makes the interval too narrow; windows would do, but one long
window (a short text, or --max-length at the context with few tokens) is one
unit and gives no interval at all, and windows of the sliding convention
score different numbers of tokens. Blocks of BLOCK_TOKENS scored tokens, in
the order the windows score them, work for every convention and any number of
windows; a text too short for MIN_BLOCKS of them gets shorter blocks
(block_tokens).

The change of a pruned configuration against the baseline is resampled in
pairs: each resample draws the same blocks for both, so the text's own
difficulty, which both share, cancels and only the difference the pruning
makes is left. The resampling draws come from a generator with a fixed seed:
the same pass gives the same intervals.

Validation (tests/test_passes.py): on simulated autocorrelated NLL streams the
interval of one half covers the true perplexity at about the nominal 95% and
the perplexity of the disjoint second half at about 83%, the rate for two
independent estimates of equal variance (P(|Z| < 1.96 / sqrt 2)); resampling
single tokens instead covers far less.
"""

from __future__ import annotations

import math

import torch

# Scored tokens per resampled block (about a paragraph of text), and the fewest blocks an interval is drawn from.
BLOCK_TOKENS = 128
MIN_BLOCKS = 20
RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def block_tokens(scored: int) -> int:
    """The block length for a pass scoring ``scored`` tokens: BLOCK_TOKENS, shorter for a short text."""
    return max(1, min(BLOCK_TOKENS, scored // MIN_BLOCKS))


def block_counts(scored: int, length: int) -> torch.Tensor:
    """Scored tokens per block (the last one may be short), float64."""
    counts = torch.full((math.ceil(scored / length),), float(length), dtype=torch.float64)
    counts[-1] = scored - length * (len(counts) - 1)
    return counts


def resample_weights(n_blocks: int, resamples: int = RESAMPLES, seed: int = SEED) -> torch.Tensor:
    """How often each block is drawn in each resample (resamples x blocks, float64), from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_blocks, (resamples, n_blocks), generator=generator)
    return torch.zeros(resamples, n_blocks, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n_blocks, dtype=torch.float64))


def _bounds(samples: torch.Tensor) -> tuple[float, float]:
    tail = (1.0 - LEVEL) / 2
    low, high = torch.quantile(samples, torch.tensor([tail, 1.0 - tail], dtype=samples.dtype)).tolist()
    return low, high


def perplexity_intervals(block_nll: torch.Tensor, counts: torch.Tensor, baseline: int | None,
                         resamples: int = RESAMPLES, seed: int = SEED
                         ) -> list[tuple[tuple[float, float] | None, tuple[float, float] | None]]:
    """Per configuration (a row of ``block_nll``, configurations x blocks of NLL sums): the perplexity's 95%
    interval and, paired with row ``baseline``, the interval of its change in percent (None for the baseline
    itself and without one). None throughout when there are fewer than two blocks."""
    n_configs, n_blocks = block_nll.shape
    if n_blocks < 2:
        return [(None, None)] * n_configs
    weights = resample_weights(n_blocks, resamples, seed)
    nll = weights @ block_nll.double().T  # resamples x configurations
    tokens = weights @ counts
    mean = nll / tokens.unsqueeze(1)
    out = []
    for c in range(n_configs):
        ppl = _bounds(mean[:, c].exp())
        change = None
        if baseline is not None and c != baseline:
            change = _bounds(torch.expm1(mean[:, c] - mean[:, baseline]) * 100.0)
        out.append((ppl, change))
    return out
