"""Inference latency that measures the model, not the sampler.

The seed kit timed sampled generation, which stops at a random EOS, so its
speed column mostly measured how many tokens happened to be produced. Here
every timed run greedily generates exactly ``gen_tokens`` new tokens (EOS is
suppressed until then), after untimed warm-up runs, with the device
synchronized around each run. The median and interquartile range are reported
because a few slow outliers (page faults, frequency changes) are common.

torch.utils.benchmark.Timer was considered and not used: it picks its own
number of runs (blocked_autorange), synchronizes CUDA but not MPS, and cannot
take a controlled clock in tests; the kit needs exactly --speed-runs runs, a
synchronization around every run on every accelerator, and a tested median and
IQR.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from models.removal import context_size

PREFILL_TOKENS = 256


@dataclass(frozen=True)
class Latency:
    latency_ms: float  # median wall time of one generate() call
    latency_iqr_ms: float
    prefill_ms: float  # median time of one forward over PREFILL_TOKENS tokens
    tokens_per_s: float  # gen_tokens / median latency


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


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


@torch.no_grad()
def measure_latency(model: nn.Module, prompt_ids: torch.Tensor, gen_tokens: int, runs: int = 10,
                    warmup: int = 2) -> Latency:
    """Time greedy generation of exactly ``gen_tokens`` tokens after ``prompt_ids`` (1-D)."""
    device = next(model.parameters()).device
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

    gen_times = _timed(generate, device, runs, warmup)
    prefill_times = _timed(prefill, device, runs, warmup)
    median = statistics.median(gen_times)
    return Latency(median, _iqr(gen_times), statistics.median(prefill_times), gen_tokens / (median / 1000.0))
