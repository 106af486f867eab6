"""Evaluating removal sets on one loaded model.

Each configuration is measured by temporarily pruning the model in place
(pruning.blocks.removed_blocks), so the kept blocks are the very tensors of
the original model: no copy, no reload, and the model is intact afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from evaluation.latency import Latency, measure_latency
from evaluation.params import count_parameters
from evaluation.perplexity import PerplexityResult, perplexity
from pruning.blocks import num_blocks, removed_blocks


@dataclass(frozen=True)
class EvalSettings:
    max_length: int
    stride: int
    batch_size: int = 1
    speed: bool = True
    speed_runs: int = 10
    speed_warmup: int = 2
    gen_tokens: int = 64
    progress: bool = True


@dataclass(frozen=True)
class Measurement:
    removed: tuple[int, ...]
    num_layers: int
    ppl: PerplexityResult
    params: int
    latency: Latency | None


def measure(model: nn.Module, ids: torch.Tensor, prompt_ids: torch.Tensor, removed: Sequence[int],
            settings: EvalSettings) -> Measurement:
    with removed_blocks(model, removed) as pruned:
        ppl = perplexity(pruned, ids, settings.max_length, settings.stride, settings.batch_size,
                         progress=settings.progress)
        latency = (measure_latency(pruned, prompt_ids, settings.gen_tokens, settings.speed_runs,
                                   settings.speed_warmup) if settings.speed else None)
        return Measurement(tuple(removed), num_blocks(pruned), ppl, count_parameters(pruned), latency)


def measure_all(model: nn.Module, ids: torch.Tensor, prompt_ids: torch.Tensor,
                removals: Iterable[Sequence[int]], settings: EvalSettings) -> Iterator[Measurement]:
    for removed in removals:
        yield measure(model, ids, prompt_ids, removed, settings)
