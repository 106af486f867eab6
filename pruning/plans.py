"""Modes that plan their configurations from the depth alone: each turns the
depth and the options into the removal sets to evaluate (the baseline is
always added by the caller). They are pure functions, registered in
pruning.modes."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from itertools import combinations

from config import RunConfig, SelectSpec
from models.units import Removal, validate_removal
from utils.errors import KitError


def baseline(config: RunConfig, n_blocks: int) -> list[Removal]:
    return []


def sequential(config: RunConfig, n_blocks: int) -> list[Removal]:
    return [(i,) for i in range(n_blocks)]


def combinatorial(config: RunConfig, n_blocks: int) -> list[Removal]:
    low = config.select.min_remove
    high = n_blocks - 1 if config.select.max_remove is None else config.select.max_remove
    if low < 1:
        raise KitError(f"--min-remove must be at least 1 (got {low})")
    if high >= n_blocks:
        raise KitError(f"--max-remove must be less than the model's {n_blocks} blocks (got {high}); "
                       f"valid: {low}..{n_blocks - 1}")
    if high < low:
        raise KitError(f"--max-remove ({high}) is smaller than --min-remove ({low})")
    count = sum(math.comb(n_blocks, k) for k in range(low, high + 1))
    if count > config.select.max_configs:
        raise KitError(f"--mode combinatorial would evaluate {count:,} configurations of a {n_blocks}-block model "
                       f"(removing {low}..{high} blocks), more than --max-configs {config.select.max_configs:,}; "
                       "narrow --min-remove/--max-remove or raise --max-configs")
    return [c for k in range(low, high + 1) for c in combinations(range(n_blocks), k)]


def removal_count(select: SelectSpec, n_blocks: int) -> int:
    """--num-remove, or --ratio x depth rounded half up (0.5 x 3 blocks -> 2)."""
    if select.num_remove is not None:
        k = select.num_remove
        if not 1 <= k < n_blocks:
            raise KitError(f"--num-remove must be between 1 and {n_blocks - 1} for a {n_blocks}-block model (got {k})")
        return k
    # exact decimal arithmetic: in floats 0.58 x 25 rounds to 14 instead of 15
    k = math.floor(Fraction(str(select.ratio)) * n_blocks + Fraction(1, 2))
    if k == 0 or k == n_blocks:
        raise KitError(f"--ratio {select.ratio} removes {k} of {n_blocks} blocks; choose a ratio that removes "
                       f"between 1 and {n_blocks - 1}, or use --num-remove")
    return k


def random_blocks(seed: int, n_blocks: int, k: int) -> Removal:
    """The random draw of --mode random, which --mode compare must repeat exactly."""
    return tuple(sorted(random.Random(seed).sample(range(n_blocks), k)))


def random_removal(config: RunConfig, n_blocks: int) -> list[Removal]:
    return [random_blocks(config.seed, n_blocks, removal_count(config.select, n_blocks))]


def custom(config: RunConfig, n_blocks: int) -> list[Removal]:
    if not config.select.remove:
        raise KitError("--mode custom needs --remove, e.g. --remove 1,3")
    return [validate_removal(config.select.remove, n_blocks)]
