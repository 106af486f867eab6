"""Modes that plan their configurations from the depth alone: each turns the
depth and the options into the removal sets to evaluate (the baseline is
always added by the caller). They are pure functions, registered in
runner.modes.

--unit chooses what a candidate is (models.units.candidate_units): whole
blocks, as always, or attentions, MLPs or both kinds of sublayer. Counts
(--num-remove, --ratio, --min-remove, --max-remove) then count those units."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from itertools import combinations
from typing import Sequence

from config import RunConfig, SelectSpec
from models.units import Removal, Unit, candidate_units, canonical, validate_removal
from utils.errors import KitError


def baseline(config: RunConfig, n_blocks: int) -> list[Removal]:
    return []


def units_of(select: SelectSpec, n_blocks: int) -> list[Unit]:
    """The candidates of --unit for an n-block model."""
    return candidate_units(select.unit, n_blocks)


def _noun(select: SelectSpec) -> str:
    return "blocks" if select.unit == "block" else "units"


def valid_sets(sets, n_blocks: int) -> list[Removal]:
    """The canonical sets among ``sets`` that keep a block and an attention (models.units.validate_removal)."""
    out = []
    for s in sets:
        try:
            out.append(validate_removal(s, n_blocks))
        except KitError:
            pass
    return out


def sequential(config: RunConfig, n_blocks: int) -> list[Removal]:
    return [canonical([u]) for u in units_of(config.select, n_blocks)]


def combinatorial(config: RunConfig, n_blocks: int) -> list[Removal]:
    units, noun = units_of(config.select, n_blocks), _noun(config.select)
    n = len(units) if config.select.unit != "block" else n_blocks
    low = config.select.min_remove
    high = n - 1 if config.select.max_remove is None else config.select.max_remove
    if low < 1:
        raise KitError(f"--min-remove must be at least 1 (got {low})")
    if high >= n:
        raise KitError(f"--max-remove must be less than the model's {n} {noun} (got {high}); "
                       f"valid: {low}..{n - 1}")
    if high < low:
        raise KitError(f"--max-remove ({high}) is smaller than --min-remove ({low})")
    count = sum(math.comb(n, k) for k in range(low, high + 1))
    if count > config.select.max_configs:
        raise KitError(f"--mode combinatorial would evaluate {count:,} configurations of a {n_blocks}-block model "
                       f"(removing {low}..{high} {noun}), more than --max-configs {config.select.max_configs:,}; "
                       "narrow --min-remove/--max-remove or raise --max-configs")
    return valid_sets((c for k in range(low, high + 1) for c in combinations(units, k)), n_blocks)


def removal_count(select: SelectSpec, n_blocks: int) -> int:
    """--num-remove, or --ratio x the number of --unit candidates rounded half up (0.5 x 3 blocks -> 2)."""
    n = n_blocks if select.unit == "block" else len(units_of(select, n_blocks))
    what = f"{n}-block model" if select.unit == "block" else f"model with {n} {select.unit} units"
    if select.num_remove is not None:
        k = select.num_remove
        if not 1 <= k < n:
            raise KitError(f"--num-remove must be between 1 and {n - 1} for a {what} (got {k})")
        return k
    # exact decimal arithmetic: in floats 0.58 x 25 rounds to 14 instead of 15
    k = math.floor(Fraction(str(select.ratio)) * n + Fraction(1, 2))
    if k == 0 or k == n:
        raise KitError(f"--ratio {select.ratio} removes {k} of {n} {_noun(select)}; choose a ratio that removes "
                       f"between 1 and {n - 1}, or use --num-remove")
    return k


def random_units(seed: int, units: Sequence[Unit], k: int) -> list[Unit]:
    """The random draw of --mode random, which --mode compare must repeat exactly (not yet checked:
    a draw of sublayers may hold every attention)."""
    return random.Random(seed).sample(list(units), k)


def random_removal(config: RunConfig, n_blocks: int) -> list[Removal]:
    k = removal_count(config.select, n_blocks)
    return [validate_removal(random_units(config.seed, units_of(config.select, n_blocks), k), n_blocks)]


def custom(config: RunConfig, n_blocks: int) -> list[Removal]:
    if not config.select.remove:
        raise KitError("--mode custom needs --remove, e.g. --remove 1,3")
    return [validate_removal(config.select.remove, n_blocks)]
