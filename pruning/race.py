"""Ranking a search step's candidate sets, in one stage or as a race over growing shares of the tokens.

Scoring every candidate on every calibration token is what a search spends
its time on, yet most candidates lose by a wide margin. A race (multi-step
selection, as EvoPress, Sieberling et al. 2024, "EvoPress: Accurate Dynamic
Model Compression via Evolutionary Search", selects offspring) scores every
candidate on the first quarter of the calibration tokens, sends the best
quarter of them (at least as many as the search needs) on to the first half,
the best quarter of those on to all tokens (a stage that would drop none is
skipped), and ranks by the last stage each reached: the final stage's sets by their score on all tokens, then those
dropped at the half, then those dropped at the quarter. The sets a search
goes on with are therefore always scored on all tokens.

Without a race (one stage: all tokens) the ranking is the plain one.
Each stage's candidates are scored together, in one shared-prefix pass
(Calibration.perplexities), and a Ranker charges a set at a stage once, so
the cost it reports is what the search needs on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from models.units import Removal, canonical
from pruning.rules import Cost, rank_key

if TYPE_CHECKING:
    from pruning.calibration import Calibration

# The shares of the calibration tokens a race's stages score on, and the share of a stage's sets that go on.
RACE_STAGES = (0.25, 0.5, 1.0)
RACE_KEEP = 0.25
RACE_RULE = (f"race: every candidate on the first {RACE_STAGES[0]:g} of the calibration tokens, the best "
             f"{RACE_KEEP:g} of them (at least the sets the search keeps) on "
             + ", then ".join(f"{s:g}" for s in RACE_STAGES[1:]) + " of them")
PLAIN_RULE = "every candidate on all calibration tokens"


@dataclass(frozen=True)
class Ranked:
    """A stage's candidates, best first, with the scores on all tokens of those that reached the end."""

    order: list[Removal]
    final: dict[Removal, float]  # the sets scored on all tokens, by their score there
    scored: int  # distinct candidates
    cost: Cost  # what this ranking spent that the ranker had not spent before


# What a search ranks with: (candidate sets, how many must be scored on all tokens) -> Ranked.
Rank = Callable[[Sequence[Removal], int], Ranked]


@dataclass
class Ranker:
    """Ranks candidate sets on ``calib`` in the stages of ``shares`` (RACE_STAGES for a race)."""

    calib: "Calibration"
    shares: tuple[float, ...] = (1.0,)
    charged: set = field(default_factory=set)  # (stage, set) pairs already paid for

    @property
    def rule(self) -> str:
        return RACE_RULE if len(self.shares) > 1 else PLAIN_RULE

    def __call__(self, sets: Sequence[Removal], need: int) -> Ranked:
        alive = list(dict.fromkeys(canonical(s) for s in sets))
        scored, dropped, cost = len(alive), [], Cost()
        final: dict[Removal, float] = {}
        last = len(self.shares) - 1
        for stage, share in enumerate(self.shares):
            if stage < last and need >= len(alive):
                continue  # every set goes on: the early stages would drop none
            view = self.calib if share >= 1 else self.calib.head(share)
            scores = dict(zip(alive, view.perplexities(alive)))
            new = [s for s in alive if (stage, s) not in self.charged]
            self.charged.update((stage, s) for s in new)
            cost += view.cost_of(new)
            ranked = sorted(alive, key=lambda s: rank_key(scores[s], s))
            if stage == last:
                final = {s: scores[s] for s in ranked}
                return Ranked(ranked + dropped, final, scored, cost)
            keep = max(need, math.ceil(len(ranked) * RACE_KEEP))
            alive, dropped = ranked[:keep], ranked[keep:] + dropped
        raise ValueError("a ranker needs at least one stage")


def plain(score: Callable[[list[Removal]], list[float]]) -> Rank:
    """A one-stage ranking by ``score`` (sets -> scores, lower better); its cost counts the sets only."""

    def rank(sets: Sequence[Removal], need: int) -> Ranked:
        todo = list(dict.fromkeys(sets))
        scores = dict(zip(todo, score(todo)))
        ranked = sorted(todo, key=lambda s: rank_key(scores[s], s))
        return Ranked(ranked, {s: scores[s] for s in ranked}, len(todo), Cost(evaluations=len(todo)))

    return rank


def ranker(calib: "Calibration", race: bool) -> Ranker:
    return Ranker(calib, RACE_STAGES if race else (1.0,))
