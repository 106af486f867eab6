"""Each rule's or search's pick at every k, or at a budget: the one driver behind the choosing modes,
compare and the granularity comparison.

A rule (pruning.rules) scores candidates once and takes the k lowest; a
search (pruning.search) grows its set one unit per step. Either way the
driver returns a Pick for k = 1, 2, ... up to ``most``, or up to the first
pick that meets ``stop`` (a budget, pruning.budget). A pick that would
remove every attention (possible with sublayers) is left out at its k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from config import SelectSpec
from models.units import Removal, is_valid
from pruning.rules import RULES, Cost
from pruning.search import SEARCHES, Step
from utils.errors import KitError

if TYPE_CHECKING:
    from pruning.calibration import Calibration


@dataclass(frozen=True)
class Pick:
    """The set a rule or search removes at one k, what it chose by, and what choosing cost up to it."""

    removal: Removal
    scores: dict[Removal, float]  # a rule's candidate scores, or a search step's candidate sets
    cost: Cost
    step: Step | None = None  # a search's step
    trail: tuple[Step, ...] = ()  # a search's steps at this size (evolve: each generation's best)


def names_for(unit: str) -> list[str]:
    """The rules that can score ``unit`` candidates, then every search."""
    return [name for name, rule in RULES.items() if unit in rule.units] + list(SEARCHES)


def picks(name: str, calib: "Calibration", select: SelectSpec, most: int,
          stop: Callable[[Removal], bool] | None = None, only: Sequence[int] | None = None) -> dict[int, Pick]:
    """k -> the pick of rule or search ``name`` for k = 1..most (or the k of ``only``), or up to the first
    meeting ``stop``. A search that grows its sets reports every size it passes through."""
    if name in SEARCHES:
        search = SEARCHES[name]
        steps = search.steps(calib, most, select, stop, only)
        sizes = sorted({s.size for s in steps})
        return {k: Pick(trail[-1].removed, trail[-1].candidates, search.cost(steps, k), trail[-1], trail)
                for k in sizes for trail in [tuple(s for s in steps if s.size == k)]}
    rule = RULES[name]
    out: dict[int, Pick] = {}
    singles = rule.scores(calib, 1) if rule.per_block else None
    for k in (range(1, most + 1) if stop is not None or only is None else only):
        scores = singles if singles is not None else rule.scores(calib, k)
        removal = rule.select(scores, k)
        if not is_valid(removal, calib.n_blocks):
            continue
        out[k] = Pick(removal, scores, rule.cost(calib))
        if stop is not None and stop(removal):
            return out
    if stop is not None:
        raise KitError(f"no choice of up to {most} units by {name} meets the target")
    return out


def at_budget(name: str, calib: "Calibration", select: SelectSpec, stop: Callable[[Removal], bool]) -> Pick:
    """The fewest units rule or search ``name`` removes to meet ``stop``."""
    found = picks(name, calib, select, len(calib.units) - 1, stop)
    return found[max(found)]

