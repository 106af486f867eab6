"""Evolutionary search over removal sets of a fixed size (EvoPress).

EvoPress (Sieberling et al. 2024, "EvoPress: Accurate Dynamic Model
Compression via Evolutionary Search") searches compression profiles with a
(1 + lambda) evolution: one parent, many offspring made by level-switch
mutations, and multi-step selection. For depth pruning a profile is the set
of k removed units, and a level switch swaps one removed unit for a kept
one, so every offspring removes k units again.

Here each generation:

1. makes ``offspring`` distinct sets from the parent, each by m swaps, m
   drawn as the smaller of two draws from 1..3 (one swap most often, three
   rarely), skipping sets that lose the last block or attention, or that
   ``allowed`` (a budget) refuses;
2. ranks them with a race (pruning.race): all on the first quarter of the
   calibration tokens, the best quarter on the first half, the best of those
   on all tokens;
3. keeps the best offspring as the new parent if it beats the parent on all
   tokens (the parent's score is known there, so the parent joins the last
   stage of selection without being scored again).

Generation 0 scores the seeds (the scoring rules' sets and greedy's) on all
tokens and starts from the best, so the result is never worse on the full
calibration tokens than any seed. A seed-less search starts from a random
valid set. Draws come from a generator seeded by --seed and k: a run is
repeatable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from models.units import Removal, Unit, canonical, is_valid
from pruning.race import Rank
from pruning.rules import Cost, rank_key
from utils.errors import KitError

# Attempts at drawing offspring per offspring wanted, before a generation makes do with fewer (a small
# neighbourhood has fewer distinct sets than --offspring).
DRAWS_PER_CHILD = 20


@dataclass(frozen=True)
class Generation:
    """A generation's best set so far, its score on all tokens, and what the generation scored and cost."""

    index: int
    best: Removal
    score: float
    final: dict[Removal, float]  # the sets it scored on all tokens
    scored: int
    cost: Cost


def as_candidates(removal: Removal, units: Sequence[Unit]) -> frozenset[Unit]:
    """A removal set as the candidate units it removes: a whole block is its two sublayers when those
    are the candidates."""
    offered = set(units)
    out = set()
    for u in removal:
        if u in offered:
            out.add(u)
        else:
            out.update(c for c in units if c.block == u.block)
    return frozenset(out)


def swaps(rng: random.Random, k: int, n: int) -> int:
    """How many removed units an offspring swaps: min of two draws from 1..3, at most min(k, n - k)."""
    return min(rng.randint(1, 3), rng.randint(1, 3), k, n - k)


def mutate(rng: random.Random, parent: frozenset[Unit], units: Sequence[Unit]) -> frozenset[Unit]:
    """The parent with m removed units swapped for m kept ones (a level switch each)."""
    removed = sorted(parent, key=lambda u: u.order)
    kept = [u for u in units if u not in parent]
    m = swaps(rng, len(removed), len(units))
    out = set(removed) - set(rng.sample(removed, m))
    out.update(rng.sample(kept, m))
    return frozenset(out)


def evolve(rank: Rank, units: Sequence[Unit], n_blocks: int, k: int, seeds: Sequence[Removal],
           generations: int, offspring: int, seed: int,
           allowed: Callable[[Removal], bool] | None = None) -> list[Generation]:
    """Generation 0 (the best seed) and one entry per generation; the last holds the best set found."""
    units = list(units)
    if not 1 <= k < len(units):
        raise ValueError(f"k must be between 1 and {len(units) - 1}, got {k}")
    rng = random.Random(f"evolve:{seed}:{k}")
    ok = lambda s: is_valid(s, n_blocks) and (allowed is None or allowed(s))
    starts = list(dict.fromkeys(canonical(s) for s in seeds if len(as_candidates(s, units)) == k and ok(s)))
    if not starts:
        starts = [_random_start(rng, units, k, ok)]
    ranked = rank(starts, len(starts))
    parent = ranked.order[0]
    best, score = as_candidates(parent, units), ranked.final[parent]
    out = [Generation(0, parent, score, ranked.final, ranked.scored, ranked.cost)]
    for index in range(1, generations + 1):
        children = _offspring(rng, best, units, offspring, ok)
        if not children:
            break  # no other valid set of k units
        ranked = rank(children, 1)
        child = ranked.order[0]
        if rank_key(ranked.final[child], child) < rank_key(score, parent):
            parent, best, score = child, as_candidates(child, units), ranked.final[child]
        out.append(Generation(index, parent, score, ranked.final, ranked.scored, ranked.cost))
    return out


def _offspring(rng: random.Random, parent: frozenset[Unit], units: Sequence[Unit], count: int,
               ok: Callable[[Removal], bool]) -> list[Removal]:
    parent_set = canonical(parent)
    children: dict[Removal, None] = {}
    for _ in range(count * DRAWS_PER_CHILD):
        if len(children) == count:
            break
        child = canonical(mutate(rng, parent, units))
        if child != parent_set and child not in children and ok(child):
            children[child] = None
    return list(children)


def _random_start(rng: random.Random, units: Sequence[Unit], k: int, ok: Callable[[Removal], bool]) -> Removal:
    for _ in range(DRAWS_PER_CHILD * 100):
        drawn = canonical(rng.sample(units, k))
        if ok(drawn):
            return drawn
    raise KitError(f"evolve found no valid set of {k} units to start from")
