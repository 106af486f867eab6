"""Evaluating removal sets on one loaded model.

Each configuration is measured on the original model, never a copy: the
speed test and the parameter count temporarily prune the model in place
(models.removal.removed_units), so the kept blocks are the very tensors of the
original model and the model is intact afterwards.

The speed test of a pruned configuration alternates its runs with the
baseline's (evaluation.latency.measure_against_baseline), so its speed change
is measured against a baseline timed at the same moments; the baseline row's
own latency comes from runs of its own.

Perplexity comes from the shared-prefix engine (evaluation.engine): a group
of configurations is evaluated in one pass over the windows, each distinct
prefix of kept blocks computed once. Every perplexity of a group is known only
at the end of its pass, so rows come in bursts: after a group's pass, each
configuration's speed test runs and its Measurement is yielded as soon as that
finishes. GROUP_SIZE is the trade-off: a larger group shares more prefixes (a
sequential sweep of up to GROUP_SIZE blocks is one group, so it gets all of
its sharing), a smaller one reports its first rows sooner and, without a
checkpoint (no results file, several processes), loses less work to a crash. Groups are consecutive runs of the configurations in the order
given (the planners list them so that neighbours share prefixes), and rows
come out in that order. ``measure`` evaluates one configuration on its own,
the reference the engine is tested against.

Each pass also gives every row its perplexity's 95% interval, the paired
interval of its change against the baseline and (``divergence``) its KL
divergence and top-1 agreement with the unpruned model (evaluation.engine
run_pass). With ``checkpoint`` (a file beside the results CSV) the pass saves
its state as it goes and once more at its end, and the file is removed only
when every row of the pass has been consumed (written): a run stopped during
a pass continues it, and one stopped during the speed tests that follow gets
the finished pass's results back from the file without a new pass.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from config import SpeedSpec, WindowSpec
from evaluation.engine import (PassResult, Work, block_flops, head_flops, nodes_flops, one_model_work, prefix_tree,
                               run_pass, tree_nodes)
from evaluation.latency import Latency, SpeedChange, measure_against_baseline, measure_latency, warn_if_noisy
from evaluation.params import count_parameters, kv_cache_bytes_per_token
from evaluation.perplexity import PerplexityResult, batch_inputs, perplexity, window_batches
from evaluation.windows import spec_windows
from models.families import num_blocks
from models.placement import input_device
from models.removal import check_units, removed_units
from evaluation.passfile import PassCheckpoint
from models.units import canonical, kept_nodes, removal_key, unit_names
from utils.errors import KitError

# Configurations evaluated together in one shared-prefix pass.
GROUP_SIZE = 64


@dataclass(frozen=True)
class EvalSettings:
    """Resolved windows (WindowSpec.resolved) and the speed test; ``speed.enabled`` False skips it.

    ``tasks`` scores a pruned model on downstream tasks (evaluation.tasks.TaskScorer); None: no --tasks.
    """

    windows: WindowSpec
    speed: SpeedSpec = SpeedSpec(enabled=False)
    progress: bool = True
    tasks: Callable[[nn.Module], dict[str, dict]] | None = None
    divergence: bool = False  # KL and top-1 agreement against the baseline (--kl)
    checkpoint: str | None = None  # the pass checkpoint file (evaluation.passfile); None: no checkpoints


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
    tasks: dict[str, dict] | None = None  # task -> metric -> value (evaluation.tasks), None without --tasks
    # Against the baseline runs interleaved with this configuration's; None for the baseline and untimed runs.
    speed: SpeedChange | None = None
    kv_cache_bytes: int | None = None  # per generated token
    # From a results pass (evaluation.engine.PassResult); None from ``measure`` (one model at a time).
    ppl_interval: tuple[float, float] | None = None
    change_interval: tuple[float, float] | None = None  # percent, paired against the baseline
    kld: float | None = None
    top1_agreement: float | None = None


def _speed(model: nn.Module, prompt_ids: torch.Tensor, removed: Sequence[int],
           speed: SpeedSpec) -> tuple[Latency, SpeedChange | None]:
    if not removed:
        latency = measure_latency(model, prompt_ids, speed.gen_tokens, speed.runs, speed.warmup)
        warn_if_noisy("the baseline", latency)
        return latency, None
    latency, change = measure_against_baseline(model, removed, prompt_ids, speed.gen_tokens, speed.runs, speed.warmup)
    warn_if_noisy(f"removing {', '.join(unit_names(removed))}", latency, change.baseline)
    return latency, change


def finish(model: nn.Module, prompt_ids: torch.Tensor | None, removed: Sequence[int], result: PassResult,
            settings: EvalSettings, work: Work | None) -> Measurement:
    """The measurements that need the pruned model itself: size, speed and downstream tasks."""
    latency, change = _speed(model, prompt_ids, removed, settings.speed) if settings.speed.enabled else (None, None)
    with removed_units(model, removed) as pruned:
        tasks = settings.tasks(pruned) if settings.tasks else None
        return Measurement(tuple(removed), num_blocks(pruned), result.ppl, count_parameters(pruned), latency, work,
                           tasks=tasks, speed=change, kv_cache_bytes=kv_cache_bytes_per_token(pruned),
                           ppl_interval=result.ppl_interval, change_interval=result.change_interval, kld=result.kld,
                           top1_agreement=result.top1_agreement)


def measure(model: nn.Module, ids: torch.Tensor, prompt_ids: torch.Tensor | None, removed: Sequence[int],
            settings: EvalSettings) -> Measurement:
    """One configuration on its own: the reference the engine must agree with."""
    w = settings.windows
    start = time.perf_counter()
    with removed_units(model, removed) as pruned:
        ppl = perplexity(pruned, ids, w.max_length, w.stride, w.batch_size, progress=settings.progress,
                         protocol=w.protocol, prefix_token=w.prefix_token)
    work = one_model_work(model, spec_windows(w, len(ids)), removed, time.perf_counter() - start)
    return finish(model, prompt_ids, removed, PassResult(ppl), settings, work)


def _groups(removals: Sequence) -> Iterator[tuple[int, Sequence]]:
    for start in range(0, len(removals), GROUP_SIZE):
        yield start, removals[start : start + GROUP_SIZE]


@torch.no_grad()
def estimated_seconds(model: nn.Module, ids: torch.Tensor, removals: Sequence[Sequence[int]],
                      windows: WindowSpec) -> tuple[float, float]:
    """How long measure_all's perplexity passes over ``removals`` will take, and the timed batch's seconds.

    One forward of the unpruned model over the first window batch is timed
    and scaled by the passes' model FLOPs (the engine's own accounting). A
    token count cannot say this: the time per token varies a thousandfold
    between models.
    """
    w, n = windows, num_blocks(model)
    all_windows = spec_windows(w, len(ids))
    inputs = batch_inputs(ids, next(window_batches(all_windows, w.batch_size)))[0].to(input_device(model))
    model(input_ids=inputs[:1, :16], use_cache=False)  # first-call set-up is not the model's speed
    start = time.perf_counter()
    model(input_ids=inputs, use_cache=False)
    seconds = time.perf_counter() - start
    batch_flops = inputs.shape[0] * n * block_flops(model, inputs.shape[1]) + head_flops(model, inputs.numel())
    scored = sum(x.scored for x in all_windows)
    flops = 0.0
    for _, group in _groups(removals):
        nodes = tree_nodes(prefix_tree([kept_nodes(n, r) for r in group]))
        flops += sum(nodes_flops(model, nodes, x.length) for x in all_windows) + len(group) * head_flops(model, scored)
    return seconds * flops / batch_flops, seconds


def measure_all(model: nn.Module, ids: torch.Tensor, prompt_ids: torch.Tensor | None,
                removals: Iterable[Sequence[int]], settings: EvalSettings) -> Iterator[Measurement]:
    """Measurements of every removal set, in the order given, in groups (see the module docstring); the
    configurations of a checkpointed pass first."""
    removals = [check_units(model, r) for r in removals]
    w = settings.windows
    checkpoint = PassCheckpoint(settings.checkpoint) if settings.checkpoint else None
    saved, rest = _checkpointed_group(checkpoint, removals)
    groups = ([saved] if saved else []) + [g for _, g in _groups(rest)]
    wanted, done = set(removals), 0
    for group in groups:
        first = done + 1
        done += len(wanted.intersection(group))
        desc = f"pass (configurations {first}-{done} of {len(removals)})" if len(groups) > 1 else "pass"
        results, work = run_pass(model, ids, group, w.max_length, w.stride, w.batch_size, progress=settings.progress,
                                 desc=desc, protocol=w.protocol, prefix_token=w.prefix_token, compare=True,
                                 divergence=settings.divergence, checkpoint=checkpoint)
        for removed, result in zip(group, results):
            if removed in wanted:
                yield finish(model, prompt_ids, removed, result, settings, work)
                work = None  # a pass's cost is carried by its first measurement
        if checkpoint:
            checkpoint.remove()  # every row of the pass is written: the consumer asked for the next one


def _checkpointed_group(checkpoint: PassCheckpoint | None, removals: list) -> tuple[list | None, list]:
    """The configurations of a saved pass (its whole group, so that its identity matches) and the others.

    A pass saved mid-way wrote none of its rows, so each of its configurations must be still to evaluate; a
    finished one may have written some (a run stopped during the speed tests), and one that wrote all is
    left over and removed.
    """
    state = checkpoint.read() if checkpoint else None
    if state is None:
        return None, removals
    group = [removal_of(key) for key in state.identity["configurations"]]
    todo = [r for r in group if r in set(removals)]
    if state.complete and not todo:
        checkpoint.remove()
        return None, removals
    foreign = [r for r in group if r and r not in set(removals)]
    if not state.complete and foreign:
        raise KitError(f"pass checkpoint '{checkpoint.path}' was made with configurations "
                       f"{', '.join(removal_key(r) for r in foreign[:6])} that this run does not evaluate; resume with the same "
                       "settings, or remove it to evaluate its configurations afresh")
    return group, [r for r in removals if r not in set(group)]


def removal_of(key: str) -> tuple:
    """The removal set that models.units.removal_key wrote as ``key``."""
    return canonical(json.loads(key))
