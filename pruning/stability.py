"""Which choices hold: each rule and search chooses again on disjoint slices of the calibration text.

With --calib-slices N the calibration tokens are cut into N consecutive,
equal, disjoint slices; every rule or search the mode runs chooses on each
slice alone, at the same k (or, with a budget, the fewest units meeting it
on that slice). The report gives, per rule and k, the set each slice chose,
how much they agree (the mean Jaccard index |A & B| / |A | B| over every
pair of slices, a whole block counting as its two sublayers), and the
spread of their calibration perplexities, each set scored on all the
calibration tokens. A choice that the slices agree on, at a small spread,
does not depend on which text it was calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Callable, Sequence

from config import SelectSpec
from models.units import SUBLAYERS, Removal, Unit, removed_label
from pruning.picks import picks
from utils.text import format_table

if TYPE_CHECKING:
    from pruning.calibration import Calibration


@dataclass(frozen=True)
class Held:
    """One rule's or search's picks at one k, one per slice, and their perplexities on all calibration tokens."""

    name: str
    k: int
    picks: tuple[Removal, ...]
    perplexities: tuple[float, ...]

    @property
    def jaccard(self) -> float:
        pairs = list(combinations(self.picks, 2))
        return sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else 1.0

    @property
    def spread(self) -> float:
        """(highest - lowest) / lowest perplexity, in percent."""
        return (max(self.perplexities) - min(self.perplexities)) / min(self.perplexities) * 100

    def as_dict(self) -> dict:
        return {"name": self.name, "k": self.k, "picks": [removed_label(p) for p in self.picks],
                "perplexities": list(self.perplexities), "mean_jaccard": self.jaccard, "spread_pct": self.spread}


def sublayer_set(removal: Removal) -> set[str]:
    """A set's removed sublayers: a whole block is its attention and its MLP."""
    return {f"{kind}{u.block}" if u.whole else u.name for u in map(Unit.of, removal)
            for kind in (SUBLAYERS if u.whole else (u.part,))}


def jaccard(a: Removal, b: Removal) -> float:
    sa, sb = sublayer_set(a), sublayer_set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def held(calib: "Calibration", select: SelectSpec, names: Sequence[str], most: int,
         stop: Callable[[Removal], bool] | None = None, only: Sequence[int] | None = None) -> list[Held]:
    """Each name's picks on each of select.calib_slices slices: at each k of ``only`` (default 1..most),
    or with ``stop`` at the fewest units meeting it on each slice (reported as k 0 where slices differ)."""
    views = calib.slices(select.calib_slices)
    found = {name: [picks(name, v, select, most, stop, only) for v in views] for name in names}
    rows: list[tuple[str, int, tuple[Removal, ...]]] = []
    for name, per_slice in found.items():
        if stop is not None:
            chosen = tuple(p[max(p)].removal for p in per_slice)
            sizes = {max(p) for p in per_slice}
            rows.append((name, sizes.pop() if len(sizes) == 1 else 0, chosen))
            continue
        for k in only or range(1, most + 1):
            if all(k in p for p in per_slice):
                rows.append((name, k, tuple(p[k].removal for p in per_slice)))
    every = list(dict.fromkeys(s for _, _, chosen in rows for s in chosen))
    score = dict(zip(every, calib.perplexities(every)))
    return [Held(name, k, chosen, tuple(score[s] for s in chosen)) for name, k, chosen in rows]


def held_table(rows: Sequence[Held], tokens: int) -> str:
    """The report: per rule and k, the picks of every slice, their agreement and perplexity spread."""
    n = len(rows[0].picks) if rows else 0
    body = ([h.name, str(h.k) if h.k else "budget", "; ".join(removed_label(p) for p in h.picks), f"{h.jaccard:.2f}",
             f"{min(h.perplexities):,.3f}-{max(h.perplexities):,.3f}", f"{h.spread:.2f}"] for h in rows)
    table = format_table(["Rule", "k", f"Picks on each of {n} slices", "Mean Jaccard", "Calibration PPL",
                          "Spread (%)"], body)
    return (f"Stability: each rule chose again on {n} disjoint slices of the {tokens:,} calibration tokens; "
            f"each pick's perplexity is on all of them\n\n{table}")
