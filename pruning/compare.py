"""How close each block-choosing rule gets to the true optimum.

For every k = 1..--max-remove each rule picks k blocks on calibration tokens
(bi, angular, ppl, greedy, beam, random with --seed, the last k blocks); the
run then measures every picked set on the evaluation tokens, along with
every k-subset where C(L, k) <= --max-configs (the exhaustive optimum) and
every single removal. Choosing and judging on different tokens keeps the
table honest: a rule that overfits its calibration text shows a gap.

The one-pass scores are also checked directly: the Spearman rank correlation
between each score and the true (evaluation) perplexity increase of removing
each block alone.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Sequence

from config import RunConfig
from models.units import Removal, row_removal
from pruning.choice import Choice
from pruning.granularity import compare_granularity
from pruning.plans import random_blocks
from pruning.rules import RULES, rank_key
from pruning.search import beam, greedy
from utils.errors import KitError
from utils.text import format_table, removal_key, removed_label

if TYPE_CHECKING:
    from pruning.calibration import Calibration

log = logging.getLogger("gpt2-pruning-kit")

# The scoring rules (pruning.rules), then the searches and the two references.
COMPARED = (*RULES, "greedy", "beam", "random", "last")


@dataclass(frozen=True)
class ComparePlan:
    n_blocks: int
    chosen: dict[int, dict[str, Removal]]  # k -> rule -> the set it removes
    exhaustive: tuple[int, ...]  # the k whose every subset is evaluated
    block_scores: dict[str, list[float]]  # scoring rule -> its score of each block alone

    def removals(self) -> list[Removal]:
        """Every set to evaluate, once: single removals, the rules' sets, then the exhaustive subsets."""
        sets = [(i,) for i in range(self.n_blocks)]
        for k, by_rule in self.chosen.items():
            sets += by_rule.values()
            if k in self.exhaustive:
                sets += combinations(range(self.n_blocks), k)
        return list(dict.fromkeys(sets))

    def roles(self, removed: Removal) -> list[str]:
        roles = [rule for rule, s in self.chosen.get(len(removed), {}).items() if s == removed]
        if len(removed) in self.exhaustive:
            roles.append("exhaustive")
        elif len(removed) == 1:
            roles.append("single")
        return roles


def plan_compare(config: RunConfig, calib: "Calibration") -> ComparePlan:
    n, select = calib.n_blocks, config.select
    high = n - 1 if select.max_remove is None else select.max_remove
    if not 1 <= high < n:
        raise KitError(f"--max-remove must be between 1 and {n - 1} for a {n}-block model (got {high})")
    greedy_steps = greedy(calib.perplexities, n, high, calib.progress)
    beam_steps = beam(calib.perplexities, n, high, select.beam_width, calib.progress)
    # every rule's scores of single blocks (a span of one block, for angular)
    singles = {name: rule.scores(calib, 1) for name, rule in RULES.items()}
    chosen = {}
    for k in range(1, high + 1):
        by_rule = {name: rule.select(singles[name] if rule.per_block else rule.scores(calib, k), k)
                   for name, rule in RULES.items()}
        by_rule["greedy"] = greedy_steps[k - 1].removed
        by_rule["beam"] = beam_steps[k - 1].removed
        by_rule["random"] = random_blocks(config.seed, n, k)
        by_rule["last"] = tuple(range(n - k, n))
        chosen[k] = by_rule
    exhaustive = tuple(k for k in chosen if math.comb(n, k) <= select.max_configs)
    block_scores = {name: [singles[name][(i,)] for i in range(n)] for name in RULES}
    return ComparePlan(n, chosen, exhaustive, block_scores)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson's r of the ranks, ties getting their average rank.

    Computed from pandas' ranks rather than method="spearman", which needs scipy.
    NaN when either side is constant.
    """
    import pandas as pd  # here, so that listing the modes (main.py --help) does not load pandas

    rx = pd.Series(list(x), dtype=float).rank(method="average")
    ry = pd.Series(list(y), dtype=float).rank(method="average")
    return float(rx.corr(ry, method="pearson"))


def _cell(value: float | None, fmt: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, fmt)


def compare_report(plan: ComparePlan, rows: list[dict], beam_width: int) -> str:
    """The rules-against-optimum table, each rule's summary, and the score correlations."""
    by_key = {removal_key(row_removal(r)): r for r in rows}
    ppl = lambda s: by_key[removal_key(s)]["perplexity"]
    base = by_key[removal_key(())]["perplexity"]
    body, gaps = [], {rule: [] for rule in COMPARED}
    for k, by_rule in plan.chosen.items():
        optimum = None
        if k in plan.exhaustive:
            optimum = min(combinations(range(plan.n_blocks), k), key=lambda s: rank_key(ppl(s), s))
            body.append([str(k), "optimum", removed_label(optimum), _cell(ppl(optimum), ",.2f"), "0.00"])
        for rule, s in by_rule.items():
            gap = (ppl(s) - ppl(optimum)) / ppl(optimum) * 100 if optimum is not None else None
            if gap is not None:
                gaps[rule].append(gap)
            body.append([str(k), rule, removed_label(s), _cell(ppl(s), ",.2f"), _cell(gap, "+,.2f")])
    table = format_table(["k", "Rule", "Removed", "Perplexity", "Gap to optimum (%)"], body)

    k_opt = len(plan.exhaustive)
    summary = format_table(
        ["Rule", f"At optimum (of {k_opt} k)", "Mean gap (%)", "Max gap (%)"],
        ([rule, str(sum(g <= 0 for g in gaps[rule])), _cell(sum(gaps[rule]) / len(gaps[rule]), "+,.2f"),
          _cell(max(gaps[rule]), "+,.2f")] if gaps[rule] else [rule, "-", "-", "-"] for rule in COMPARED))

    increase = [ppl((i,)) - base for i in range(plan.n_blocks)]
    corr = ", ".join(f"{m} {_cell(spearman(plan.block_scores[m], increase), '+.3f')}" for m in RULES)
    skipped = [k for k in plan.chosen if k not in plan.exhaustive]
    notes = [f"Rules chose on calibration tokens; every perplexity here is on the evaluation tokens "
             f"(baseline {base:,.2f}). beam width {beam_width}."]
    if skipped:
        notes.append(f"No exhaustive optimum for k = {', '.join(map(str, skipped))} "
                     f"(more than --max-configs subsets).")
    notes.append(f"Spearman correlation of each one-pass score with the true single-removal perplexity increase "
                 f"over {plan.n_blocks} blocks: {corr}")
    return "\n\n".join(["Rules against the exhaustive optimum", table, summary, *notes])


def compare(config: RunConfig, calib: "Calibration") -> Choice:
    if config.select.target_params is not None:  # whole blocks against sublayers at equal size
        return compare_granularity(config, calib)
    plan = plan_compare(config, calib)
    removals = plan.removals()
    extras = {}
    for s in removals:
        extras[s] = {"metric": ",".join(plan.roles(s))}
        if len(s) == 1:
            extras[s]["scores"] = json.dumps({m: plan.block_scores[m][s[0]] for m in RULES})
    return Choice(removals, extras, lambda rows: compare_report(plan, rows, config.select.beam_width),
                  sweep_table=False)
