"""Searching removal sets by calibration perplexity, one registry entry per search.

Exhaustive search costs C(L, k) evaluations, out of reach for deep models
(gpt2-xl: C(48, 12) is about 7e10). Two cheaper searches:

- greedy iterative elimination (SLEB, Song et al. 2024): remove one block at
  a time, each time the one whose removal, given those already gone, raises
  calibration perplexity least. About k x L evaluations.
- beam search keeps the W best sets of each size and extends each by every
  remaining block. Width 1 is greedy; wider beams can undo a greedy step that
  looked good alone. At most about W x k x L evaluations.

Both search over any candidate units (models.units): blocks, or the
attention and MLP sublayers (BlockPruner, Zhong et al. 2024, searches
sublayers this way). A step adds one unit; a set that would lose its last
block or attention is not a candidate. Add a search with one class and one
SEARCHES entry; pruning.picks then runs it wherever rules are compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from config import SelectSpec
from models.units import Removal, Unit, UnitLike, extended, is_valid
from pruning.rules import Cost, rank_key
from utils.errors import KitError
from utils.log import progress_bar

if TYPE_CHECKING:
    from pruning.calibration import Calibration

# Scores a search step's candidate sets together (lower is better), so that an
# evaluator can share work between them (pruning.calibration.Calibration.perplexities).
Scorer = Callable[[list[Removal]], list[float]]


@dataclass(frozen=True)
class Step:
    """One level of a search: the set it keeps, its score, and every candidate it scored."""

    removed: Removal
    score: float
    candidates: dict[Removal, float]


def _extensions(removed: Removal, units: Sequence[Unit], n_blocks: int) -> list[Removal]:
    grown = (extended(removed, u) for u in units)
    return [s for s in grown if s is not None and is_valid(s, n_blocks)]


def greedy(score: Scorer, n_blocks: int, k: int, progress: bool = True,
           units: Sequence[UnitLike] | None = None, stop: Callable[[Removal], bool] | None = None) -> list[Step]:
    """Steps 1..k of iterative elimination; ``score`` maps removal sets to calibration perplexities."""
    return beam(score, n_blocks, k, width=1, progress=progress, units=units, stop=stop)


def beam(score: Scorer, n_blocks: int, k: int, width: int, progress: bool = True,
         units: Sequence[UnitLike] | None = None, stop: Callable[[Removal], bool] | None = None) -> list[Step]:
    """Best set of each size 1..k found by a beam of ``width`` sets; ``units`` are the candidates
    (default: the n_blocks blocks), and size counts the units removed. With ``stop`` (a budget,
    pruning.budget) the search ends at the first step whose best set meets it.

    Ties are broken by the sets themselves, so the search is deterministic;
    a step's ``candidates`` are the distinct sets it scored.
    """
    units = [Unit.of(u) for u in (range(n_blocks) if units is None else units)]
    if not 1 <= k < len(units):
        raise ValueError(f"k must be between 1 and {len(units) - 1}, got {k}")
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    frontier: list[Removal] = [()]
    steps = []
    for size in progress_bar(range(1, k + 1), desc="search", unit="step", leave=False, disable=not progress):
        todo = list(dict.fromkeys(c for base in frontier for c in _extensions(base, units, n_blocks)))
        if not todo:
            raise KitError(f"no unit can be removed after {size - 1} without losing the last block or attention")
        candidates = dict(zip(todo, score(todo)))
        ranked = sorted(candidates, key=lambda c: rank_key(candidates[c], c))
        frontier = ranked[:width]
        steps.append(Step(frontier[0], candidates[frontier[0]], candidates))
        if stop is not None and stop(frontier[0]):
            return steps
    if stop is not None:
        raise KitError(f"no set of up to {k} units found by the search meets the target")
    return steps


class Search:
    """A search over removal sets of growing size, scored by calibration perplexity."""

    name = ""
    title = ""

    def width(self, select: SelectSpec) -> int:
        return 1

    def steps(self, calib: "Calibration", most: int, select: SelectSpec,
              stop: Callable[[Removal], bool] | None = None) -> list[Step]:
        return beam(calib.perplexities, calib.n_blocks, most, self.width(select), calib.progress,
                    units=calib.units, stop=stop)

    def cost(self, steps: Sequence[Step]) -> Cost:
        """The sets it scored (the cache shares some with other rules; this is what it needs alone)."""
        return Cost(evaluations=sum(len(s.candidates) for s in steps))


class Greedy(Search):
    name, title = "greedy", "Greedy elimination (SLEB)"


class Beam(Search):
    name, title = "beam", "Beam search"

    def width(self, select: SelectSpec) -> int:
        return select.beam_width


SEARCHES: dict[str, Search] = {s.name: s for s in (Greedy(), Beam())}
