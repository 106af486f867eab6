"""Evaluating removal sets on one loaded model.

Each configuration is measured on the original model, never a copy: the
speed test and the parameter count temporarily prune the model in place
(models.removal.removed_units), so the kept blocks are the very tensors of the
original model and the model is intact afterwards.

Perplexity comes from the shared-prefix engine (evaluation.engine): a group
of configurations is evaluated in one pass over the windows, each distinct
prefix of kept blocks computed once. Every perplexity of a group is known only
at the end of its pass, so rows come in bursts: after a group's pass, each
configuration's speed test runs and its Measurement is yielded as soon as that
finishes. GROUP_SIZE is the trade-off: a larger group shares more prefixes (a
sequential sweep of up to GROUP_SIZE blocks is one group, so it gets all of
its sharing), a smaller one loses less work to a crash and reports its first
rows sooner. Groups are consecutive runs of the configurations in the order
given (the planners list them so that neighbours share prefixes), and rows
come out in that order. ``measure`` evaluates one configuration on its own,
the reference the engine is tested against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from config import SpeedSpec, WindowSpec
from evaluation.engine import Work, one_model_work, sweep_perplexities
from evaluation.latency import Latency, measure_latency
from evaluation.params import count_parameters, kv_cache_bytes_per_token
from evaluation.perplexity import PerplexityResult, perplexity
from models.families import num_blocks
from models.removal import check_units, removed_units

# Configurations evaluated together in one shared-prefix pass.
GROUP_SIZE = 64


@dataclass(frozen=True)
class EvalSettings:
    """Resolved windows (WindowSpec.resolved) and the speed test; ``speed.enabled`` False skips it."""

    windows: WindowSpec
    speed: SpeedSpec = SpeedSpec(enabled=False)
    progress: bool = True


@dataclass(frozen=True)
class Measurement:
    removed: tuple  # the removal set, canonical (models.units)
    num_layers: int
    ppl: PerplexityResult
    params: int
    latency: Latency | None
    # The cost of the perplexity pass that produced this measurement; a pass
    # shared by a group of configurations is carried by the group's first one.
    work: Work | None = None
    kv_cache_bytes: int | None = None  # per generated token


def _finish(model: nn.Module, prompt_ids: torch.Tensor | None, removed: Sequence[int], ppl: PerplexityResult,
            settings: EvalSettings, work: Work | None) -> Measurement:
    """The measurements that need the pruned model itself: size and speed."""
    speed = settings.speed
    with removed_units(model, removed) as pruned:
        latency = (measure_latency(pruned, prompt_ids, speed.gen_tokens, speed.runs, speed.warmup)
                   if speed.enabled else None)
        return Measurement(tuple(removed), num_blocks(pruned), ppl, count_parameters(pruned), latency, work,
                           kv_cache_bytes_per_token(pruned))


def measure(model: nn.Module, ids: torch.Tensor, prompt_ids: torch.Tensor | None, removed: Sequence[int],
            settings: EvalSettings) -> Measurement:
    """One configuration on its own: the reference the engine must agree with."""
    w = settings.windows
    start = time.perf_counter()
    with removed_units(model, removed) as pruned:
        ppl = perplexity(pruned, ids, w.max_length, w.stride, w.batch_size, progress=settings.progress)
    work = one_model_work(model, len(ids), removed, w.max_length, w.stride, time.perf_counter() - start)
    return _finish(model, prompt_ids, removed, ppl, settings, work)


def measure_all(model: nn.Module, ids: torch.Tensor, prompt_ids: torch.Tensor | None,
                removals: Iterable[Sequence[int]], settings: EvalSettings) -> Iterator[Measurement]:
    """Measurements of every removal set, in the order given, in groups (see the module docstring)."""
    removals = [check_units(model, r) for r in removals]
    w = settings.windows
    for start in range(0, len(removals), GROUP_SIZE):
        group = removals[start : start + GROUP_SIZE]
        desc = (f"windows (configurations {start + 1}-{start + len(group)} of {len(removals)})"
                if len(removals) > GROUP_SIZE else "windows")
        ppls, work = sweep_perplexities(model, ids, group, w.max_length, w.stride, w.batch_size,
                                        progress=settings.progress, desc=desc)
        for i, (removed, ppl) in enumerate(zip(group, ppls)):
            yield _finish(model, prompt_ids, removed, ppl, settings, work if i == 0 else None)
