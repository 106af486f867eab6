"""Scoring rules: which blocks matter least, judged on calibration tokens.

A rule is a small object with one job: ``scores`` maps candidates (removal
sets) to a score, lower meaning safer to remove, and ``select`` turns those
scores into the k blocks it removes. The importance mode runs the rule named
by --metric; compare runs every rule of RULES; the importance figure lays
their scores out in this order. Add a rule with one class and one RULES entry
(and a test that an exact identity block scores as safest).

The three published criteria:

- Block Influence (bi), ShortGPT (Men et al. 2024): 1 minus the cosine
  similarity between the hidden state entering and leaving a block, averaged
  over tokens. A block that barely turns the residual stream does little.
- Angular distance, Gromov et al. 2024 ("The Unreasonable Ineffectiveness of
  the Deeper Layers"): arccos(cosine)/pi between the hidden state entering
  block i and leaving block i+n-1; the span of n blocks that moves the stream
  least is removed together. Gromov et al. measure it at each sequence's last
  token; here it is averaged over every calibration token, the same quantity
  with many more samples.
- ppl, the perplexity criterion of Shortened LLaMA (Kim et al. 2024): the
  calibration perplexity of the model with the block removed alone.

bi and every span's angular distance come from one forward pass over the
calibration tokens; ppl costs one calibration evaluation per block (shared
prefixes: about L(L+1)/2 block evaluations per window in all).

With --unit attn, mlp or sublayer (Calibration.unit) the candidates are
sublayers: bi is taken across each sublayer (the stream before and after its
output is added, pruning.calibration), ppl removes each sublayer alone, and
angular measures runs of consecutive sublayers (attn0, mlp0, attn1, ...),
which exist only when both kinds are candidates (--unit sublayer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, astuple, dataclass
from typing import TYPE_CHECKING

from models.units import Removal, canonical, unit_order
from utils.errors import KitError

if TYPE_CHECKING:  # the rules only call its methods; importing it would load torch for --help
    from pruning.calibration import Calibration


@dataclass(frozen=True)
class Cost:
    """What choosing needed on calibration tokens: one-pass forward passes, sets evaluated for their
    calibration perplexity (each a shared-prefix evaluation of one configuration), the tokens those
    scored (a set scored on 1,000 tokens counts 1,000), and block evaluations (one block on one window;
    sets scored together share their common prefixes, evaluation.engine)."""

    passes: int = 0
    evaluations: int = 0
    tokens: int = 0
    block_evals: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"{self.passes} pass" + "es" * (self.passes != 1)] if self.passes else []
        parts += [f"{self.evaluations:,} sets"] if self.evaluations or not parts else []
        parts += [f"{self.tokens:,} tokens", f"{self.block_evals:,} block evals"] if self.tokens else []
        return ", ".join(parts)


def rank_key(score: float, removal: Removal) -> tuple[float, tuple]:
    """Sort key: lower score first, NaN (a broken evaluation) last, ties by the set."""
    return (math.inf if math.isnan(score) else score, unit_order(removal))


def ranked(scores: dict[Removal, float]) -> list[Removal]:
    return sorted(scores, key=lambda c: rank_key(scores[c], c))


class BlockRule:
    """A rule that scores each block on its own and removes the k lowest (ties: the earlier block)."""

    name = ""
    title = ""
    per_block = True  # its scores are one per block, whatever k is
    one_pass = True  # it reads the one-pass scores (the rules that do share that pass)
    units = ("block", "attn", "mlp", "sublayer")  # the --unit kinds it can score

    def scores(self, calib: "Calibration", k: int) -> dict[Removal, float]:
        raise NotImplementedError

    def cost(self, calib: "Calibration") -> Cost:
        """What the rule needs on its own, whatever k: one pass for the one-pass scores."""
        return calib.pass_cost()

    def select(self, scores: dict[Removal, float], k: int) -> Removal:
        return canonical([c[0] for c in ranked(scores)[:k]])


class BlockInfluence(BlockRule):
    name, title = "bi", "Block Influence"

    def scores(self, calib: "Calibration", k: int) -> dict[Removal, float]:
        if calib.unit == "block":
            return {(i,): s for i, s in enumerate(calib.one_pass().bi())}
        per_unit = calib.one_pass().unit_bi()
        return {(u,): per_unit[u] for u in calib.units}


class CalibrationPerplexity(BlockRule):
    name, title = "ppl", "Calibration PPL"
    one_pass = False

    def scores(self, calib: "Calibration", k: int) -> dict[Removal, float]:
        return calib.single_removal()

    def cost(self, calib: "Calibration") -> Cost:
        return calib.cost_of([(u,) for u in calib.units])


class AngularDistance(BlockRule):
    """Scores every span of k consecutive blocks and removes the lowest span."""

    name, title = "angular", "Angular distance"
    per_block = False
    units = ("block", "sublayer")  # runs of consecutive blocks, or of consecutive sublayers

    def scores(self, calib: "Calibration", k: int) -> dict[Removal, float]:
        if calib.unit == "block":
            return calib.one_pass().angular(k)
        if calib.unit not in self.units:
            raise KitError(f"--metric angular scores runs of consecutive units, which --unit {calib.unit} does not "
                           "have; use --unit block or sublayer, or another --metric")
        return calib.one_pass().unit_angular(k)

    def select(self, scores: dict[Removal, float], k: int) -> Removal:
        return ranked(scores)[0]


RULES: dict[str, BlockRule] = {rule.name: rule for rule in (BlockInfluence(), AngularDistance(),
                                                             CalibrationPerplexity())}


def choose(rule: BlockRule, calib: "Calibration", k: int) -> tuple[Removal, dict[Removal, float]]:
    """The k blocks ``rule`` removes, and the scores it chose them by."""
    scores = rule.scores(calib, k)
    return rule.select(scores, k), scores
