"""Inference latency that measures the model, not the sampler.

The seed kit timed sampled generation, which stops at a random EOS, so its
speed column mostly measured how many tokens happened to be produced. Here
every timed run greedily generates exactly ``gen_tokens`` new tokens (EOS is
suppressed until then), after untimed warm-up runs, with the device
synchronized around each run. The median and interquartile range are reported
because a few slow outliers (page faults, frequency changes) are common.

A pruned configuration is timed against the baseline, not after it: its runs
alternate with runs of the unpruned model (the blocks are swapped in and out
in place, which costs nothing measurable), so a machine that gets busier or
quieter during a sweep slows both alike. The order within each pair flips
from one pair to the next (baseline first, then pruned first, ...) so that a
steady drift favours neither. The change is the ratio of the two medians, and
its uncertainty a percentile bootstrap over the run pairs (resampling whole
pairs keeps what they share), as Kalibera and Jones recommend for ratios of
execution times (2013, "Rigorous Benchmarking in Reasonable Time"). A change
whose interval includes 0 is within the timing noise: the runs cannot tell the
two models apart.

torch.utils.benchmark.Timer was considered and not used: it picks its own
number of runs (blocked_autorange), synchronizes CUDA but not MPS, and cannot
take a controlled clock in tests; the kit needs exactly --speed-runs runs, a
synchronization around every run on every accelerator, and a tested median and
IQR.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from dataclasses import dataclass
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

from models.placement import input_device
from models.removal import context_size, removed_units

log = logging.getLogger("gpt2-pruning-kit")

PREFILL_TOKENS = 256
# The speed change's interval: its confidence, and bootstrap resamples (seeded, so a file's numbers reproduce).
CONFIDENCE = 0.95
RESAMPLES = 2000
# Fewer run pairs than this give no interval worth the name: the change is then unbounded, within the noise.
MIN_PAIRS = 5
# Beyond this interquartile range, as a share of the median, the machine is too busy for timings to mean much.
NOISY_SPREAD = 0.10


@dataclass(frozen=True)
class Latency:
    latency_ms: float  # median wall time of one generate() call
    latency_iqr_ms: float
    prefill_ms: float  # median time of one forward over PREFILL_TOKENS tokens
    tokens_per_s: float  # gen_tokens / median latency


@dataclass(frozen=True)
class SpeedChange:
    """A configuration's latency against the baseline runs interleaved with its own."""

    baseline: Latency  # the baseline's runs that alternated with the configuration's
    change_pct: float  # median latency / baseline median - 1, in percent (negative is faster)
    low_pct: float  # the change's CONFIDENCE interval
    high_pct: float

    @property
    def within_noise(self) -> bool:
        return self.low_pct <= 0.0 <= self.high_pct


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn: Callable[[], object], device: torch.device, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _timed_pairs(fn: Callable[[], object], states: tuple[Callable[[], ContextManager], Callable[[], ContextManager]],
                 device: torch.device, runs: int, warmup: int) -> tuple[list[float], list[float]]:
    """``runs`` timings of ``fn`` in each of two states of the model, alternating; each pair's order
    flips from the last pair's. Entering and leaving a state is outside the timed call."""
    for state in states:
        with state():
            _timed(fn, device, 0, warmup)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(runs):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            with states[which]():
                times[which].extend(_timed(fn, device, 1, 0))
    return times


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def _runs(model: nn.Module, prompt_ids: torch.Tensor, gen_tokens: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """The two timed calls on ``model`` as it is when called: generation, and one prefill forward."""
    device = input_device(model)
    inputs = prompt_ids.view(1, -1).to(device)
    mask = torch.ones_like(inputs)
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0

    def generate() -> None:
        out = model.generate(inputs, attention_mask=mask, max_new_tokens=gen_tokens,
                             min_new_tokens=gen_tokens, do_sample=False, use_cache=True,
                             pad_token_id=pad)
        assert out.shape[1] == inputs.shape[1] + gen_tokens

    n_prefill = min(PREFILL_TOKENS, context_size(model))
    prefill_ids = torch.arange(n_prefill, device=device).remainder(model.config.vocab_size).view(1, -1)

    def prefill() -> None:
        model(input_ids=prefill_ids, use_cache=False)

    return generate, prefill


def _latency(gen_times: Sequence[float], prefill_times: Sequence[float], gen_tokens: int) -> Latency:
    median = statistics.median(gen_times)
    return Latency(median, _iqr(list(gen_times)), statistics.median(prefill_times), gen_tokens / (median / 1000.0))


@torch.no_grad()
def measure_latency(model: nn.Module, prompt_ids: torch.Tensor, gen_tokens: int, runs: int = 10,
                    warmup: int = 2) -> Latency:
    """Time greedy generation of exactly ``gen_tokens`` tokens after ``prompt_ids`` (1-D)."""
    device = input_device(model)
    generate, prefill = _runs(model, prompt_ids, gen_tokens)
    return _latency(_timed(generate, device, runs, warmup), _timed(prefill, device, runs, warmup), gen_tokens)


def estimated_speed_seconds(model: nn.Module, prompt_ids: torch.Tensor, gen_tokens: int, runs: int, warmup: int,
                            pruned_configs: int) -> float:
    """How long a run's speed tests will take: one generation and one prefill of the unpruned model,
    timed, times the calls the tests make (the baseline's own runs and warm-ups, then twice that for
    each pruned configuration, whose runs alternate with the baseline's). Pruned models are faster,
    so this errs high. On a CPU the tests can take far longer than the perplexity passes: about 20 of
    24 minutes for a distilgpt2-shaped sweep over 4,096 tokens on the 2-core development machine,
    shared with other jobs at the time.
    """
    generate, prefill = _runs(model, prompt_ids, gen_tokens)
    device = input_device(model)
    _sync(device)
    start = time.perf_counter()
    generate()
    prefill()
    _sync(device)
    return (time.perf_counter() - start) * (runs + warmup) * (1 + 2 * pruned_configs)


def change_interval(baseline_ms: Sequence[float], config_ms: Sequence[float]) -> tuple[float, float, float]:
    """Change of the median latency against the baseline's, in percent, and its CONFIDENCE interval.

    ``baseline_ms[i]`` and ``config_ms[i]`` are the i-th pair of interleaved
    runs. The interval is a percentile bootstrap of the same statistic over
    resampled pairs; with fewer than MIN_PAIRS pairs it is unbounded (a
    bootstrap of two or three pairs would claim a confidence it has not).
    """
    change = lambda b, c: (statistics.median(c) / statistics.median(b) - 1.0) * 100.0
    point = change(baseline_ms, config_ms)
    n = len(baseline_ms)
    if n < MIN_PAIRS:
        return point, -math.inf, math.inf
    rng = random.Random(0)
    draws = []
    for _ in range(RESAMPLES):
        picks = [rng.randrange(n) for _ in range(n)]
        draws.append(change([baseline_ms[i] for i in picks], [config_ms[i] for i in picks]))
    draws.sort()
    tail = (1.0 - CONFIDENCE) / 2.0
    return point, draws[int(tail * RESAMPLES)], draws[int((1.0 - tail) * RESAMPLES) - 1]


@torch.no_grad()
def measure_against_baseline(model: nn.Module, removed: Sequence[int], prompt_ids: torch.Tensor, gen_tokens: int,
                             runs: int = 10, warmup: int = 2) -> tuple[Latency, SpeedChange]:
    """The latency of ``model`` with ``removed`` blocks, its runs alternating with the unpruned model's.

    Twice the runs of measure_latency: ``runs`` (and ``warmup``) of each model.
    """
    device = input_device(model)
    generate, prefill = _runs(model, prompt_ids, gen_tokens)
    states = (nullcontext, lambda: removed_units(model, removed))
    base_gen, config_gen = _timed_pairs(generate, states, device, runs, warmup)
    base_prefill, config_prefill = _timed_pairs(prefill, states, device, runs, warmup)
    change, low, high = change_interval(base_gen, config_gen)
    baseline = _latency(base_gen, base_prefill, gen_tokens)
    return _latency(config_gen, config_prefill, gen_tokens), SpeedChange(baseline, change, low, high)


def _spread(latency: Latency) -> float:
    return latency.latency_iqr_ms / latency.latency_ms


def warn_if_noisy(what: str, latency: Latency, baseline: Latency | None = None) -> None:
    """A spread this wide means the machine was busy: say so where the user looks (once per configuration)."""
    if max(_spread(x) for x in (latency, baseline) if x is not None) <= NOISY_SPREAD:
        return
    also = "" if baseline is None else (f"; the baseline runs interleaved with them: {baseline.latency_iqr_ms:,.2f} ms, "
                                        f"{_spread(baseline):.0%} of {baseline.latency_ms:,.2f} ms")
    log.warning(f"Timing of {what} is noisy (interquartile range over {NOISY_SPREAD:.0%} of the median): "
                f"{latency.latency_iqr_ms:,.2f} ms, {_spread(latency):.0%} of {latency.latency_ms:,.2f} ms{also}. "
                "Is the machine busy? Speed changes are reported with their interval; more --speed-runs narrow it.")
