"""Searching removal sets by calibration perplexity, one registry entry per search.

Exhaustive search costs C(L, k) evaluations, out of reach for deep models
(gpt2-xl: C(48, 12) is about 7e10). Three cheaper searches:

- greedy iterative elimination (SLEB, Song et al. 2024): remove one block at
  a time, each time the one whose removal, given those already gone, raises
  calibration perplexity least. About k x L evaluations.
- beam search keeps the W best sets of each size and extends each by every
  remaining block. Width 1 is greedy; wider beams can undo a greedy step that
  looked good alone. At most about W x k x L evaluations.
- evolve (EvoPress, Sieberling et al. 2024): an evolutionary search over sets
  of exactly k units, seeded with the rules' and greedy's sets
  (pruning.evolve).

All search over any candidate units (models.units): blocks, or the
attention and MLP sublayers (BlockPruner, Zhong et al. 2024, searches
sublayers this way). A set that would lose its last block or attention is
not a candidate. Each step ranks its candidates with a pruning.race Ranker:
on all calibration tokens, or with --race in stages over growing shares of
them. Add a search with one class and one SEARCHES entry; pruning.picks then
runs it wherever rules are compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from config import SelectSpec
from models.units import Removal, Unit, UnitLike, extended, is_valid
from pruning.evolve import Generation, evolve
from pruning.race import Rank, plain, ranker
from pruning.rules import RULES, Cost
from utils.errors import KitError
from utils.log import progress_bar

if TYPE_CHECKING:
    from pruning.calibration import Calibration

# Scores a search step's candidate sets together (lower is better), so that an
# evaluator can share work between them (pruning.calibration.Calibration.perplexities).
Scorer = Callable[[list[Removal]], list[float]]


@dataclass(frozen=True)
class Step:
    """One step of a search: the set it keeps, its score, the candidates it scored on all calibration
    tokens (with a race, those that reached the last stage), and what the step cost."""

    removed: Removal
    score: float
    candidates: dict[Removal, float]
    size: int  # units removed (a whole block is two when the candidates are sublayers)
    scored: int = 0  # distinct candidate sets scored, on any share of the tokens
    cost: Cost = Cost()
    label: str = ""  # what the step is where not a size: "generation 3"


def _extensions(removed: Removal, units: Sequence[Unit], n_blocks: int) -> list[Removal]:
    grown = (extended(removed, u) for u in units)
    return [s for s in grown if s is not None and is_valid(s, n_blocks)]


def greedy(score: Scorer | None, n_blocks: int, k: int, progress: bool = True,
           units: Sequence[UnitLike] | None = None, stop: Callable[[Removal], bool] | None = None,
           rank: Rank | None = None) -> list[Step]:
    """Steps 1..k of iterative elimination; ``score`` maps removal sets to calibration perplexities."""
    return beam(score, n_blocks, k, width=1, progress=progress, units=units, stop=stop, rank=rank)


def beam(score: Scorer | None, n_blocks: int, k: int, width: int, progress: bool = True,
         units: Sequence[UnitLike] | None = None, stop: Callable[[Removal], bool] | None = None,
         rank: Rank | None = None) -> list[Step]:
    """Best set of each size 1..k found by a beam of ``width`` sets; ``units`` are the candidates
    (default: the n_blocks blocks), and size counts the units removed. With ``stop`` (a budget,
    pruning.budget) the search ends at the first step whose best set meets it. ``rank`` (a
    pruning.race ranking, e.g. a race) replaces the plain ranking by ``score``.

    Ties are broken by the sets themselves, so the search is deterministic;
    a step's ``candidates`` are the distinct sets it scored on all tokens.
    """
    rank = rank or plain(score)
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
        ranked = rank(todo, width)
        frontier = ranked.order[:width]
        steps.append(Step(frontier[0], ranked.final[frontier[0]], ranked.final, size, ranked.scored, ranked.cost))
        if stop is not None and stop(frontier[0]):
            return steps
    if stop is not None:
        raise KitError(f"no set of up to {k} units found by the search meets the target")
    return steps


class Search:
    """A search over removal sets, scored by calibration perplexity; its steps grow one unit at a time."""

    name = ""
    title = ""

    def width(self, select: SelectSpec) -> int:
        return 1

    def steps(self, calib: "Calibration", most: int, select: SelectSpec,
              stop: Callable[[Removal], bool] | None = None, only: Sequence[int] | None = None) -> list[Step]:
        """Its steps up to sets of ``most`` units, or up to the first set meeting ``stop`` (a search that
        grows its sets passes through every size, whatever ``only`` asks)."""
        return beam(None, calib.n_blocks, most, self.width(select), calib.progress, units=calib.units, stop=stop,
                    rank=ranker(calib, select.race))

    def cost(self, steps: Sequence[Step], k: int) -> Cost:
        """What its pick at size k needs alone (the cache shares some sets with other rules)."""
        return sum((s.cost for s in steps if s.size <= k), Cost())


class Greedy(Search):
    name, title = "greedy", "Greedy elimination (SLEB)"


class Beam(Search):
    name, title = "beam", "Beam search"

    def width(self, select: SelectSpec) -> int:
        return select.beam_width


def rule_picks(calib: "Calibration", k: int) -> dict[str, Removal]:
    """Each scoring rule's set of k units, for the rules that can score the calibration's units and
    where the set keeps a block and an attention."""
    out = {}
    for name, rule in RULES.items():
        if calib.unit in rule.units:
            removal = rule.select(rule.scores(calib, 1 if rule.per_block else k), k)
            if is_valid(removal, calib.n_blocks):
                out[name] = removal
    return out


def seeding_cost(calib: "Calibration") -> Cost:
    """What the rules' sets cost together: the one-pass rules share their pass."""
    rules = [r for r in RULES.values() if calib.unit in r.units]
    shared = calib.pass_cost() if any(r.one_pass for r in rules) else Cost()
    return sum((r.cost(calib) for r in rules if not r.one_pass), shared)


class Evolve(Search):
    """EvoPress (Sieberling et al. 2024) at each size k: its steps are each generation's best set."""

    name, title = "evolve", "Evolutionary search (EvoPress)"

    def steps(self, calib: "Calibration", most: int, select: SelectSpec,
              stop: Callable[[Removal], bool] | None = None, only: Sequence[int] | None = None) -> list[Step]:
        """At every k = 1..most (or the k of ``only``); with ``stop`` (a budget) at the size greedy needs
        to meet it, keeping only sets that meet it."""
        seeds_by = Greedy().steps(calib, most, select, stop)
        sizes = [seeds_by[-1].size] if stop is not None else (only or range(1, most + 1))
        rank = ranker(calib, True)
        rules_cost = seeding_cost(calib)
        steps = []
        for k in progress_bar(sizes, desc="evolve", unit="k", leave=False, disable=not calib.progress):
            greedy_k = [s for s in seeds_by if s.size == k]
            seeds = list(rule_picks(calib, k).values()) + [s.removed for s in greedy_k]
            seeds = [s for s in seeds if stop is None or stop(s)]
            greedy_cost = sum((s.cost for s in seeds_by if s.size <= k), Cost())
            generations = evolve(rank, calib.units, calib.n_blocks, k, seeds, select.generations, select.offspring,
                                 select.seed, allowed=stop)
            steps += [_step(g, k, rules_cost + greedy_cost if g.index == 0 else Cost()) for g in generations]
        return steps

    def cost(self, steps: Sequence[Step], k: int) -> Cost:
        """Its seeds (the rules, greedy up to k) and its generations at k: each k is its own evolution."""
        return sum((s.cost for s in steps if s.size == k), Cost())


def _step(g: Generation, k: int, seeding: Cost) -> Step:
    return Step(g.best, g.score, g.final, k, g.scored, g.cost + seeding, f"generation {g.index}")


SEARCHES: dict[str, Search] = {s.name: s for s in (Greedy(), Beam(), Evolve())}
