"""How close each rule gets to the true optimum.

For every k = 1..--max-remove each rule picks k units on calibration tokens
(bi, angular, ppl, greedy, beam, evolve, random with --seed, the last k
units); the run then measures every picked set on the evaluation tokens,
along with every k-subset where C(n, k) <= --max-configs (the exhaustive
optimum) and every single removal. Choosing and judging on different tokens
keeps the table honest: a rule that overfits its calibration text shows a gap.

Where C(n, k) exceeds --max-configs the optimum is out of reach, and the
reference is the "best found": of the sets the searches (greedy, beam,
evolve) chose, the one with the lowest evaluation perplexity, shown with what
its search cost. It bounds the optimum from above and is never called one.
Each row shows what choosing its set cost the rule alone (pruning.rules.Cost).

Units are whole blocks, or with --unit attention and MLP sublayers (a block
whose two sublayers are both removed counts as two units), so the same table
says how well each rule picks sublayers. A rule that cannot score a kind of
unit (angular: runs of consecutive units, which attention-only or MLP-only
candidates do not have) is left out.

The one-pass scores are also checked directly: the Spearman rank correlation
between each score and the true (evaluation) perplexity increase of removing
each unit alone.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Callable, Sequence

from config import RunConfig
from models.units import Removal, Unit, canonical, config_key, removal_key, removed_label, row_removal, sublayers_in
from pruning.choice import Choice
from pruning.granularity import compare_granularity
from pruning.plans import random_units, valid_sets
from pruning.choosers import choosing_info
from pruning.picks import names_for, picks
from pruning.rules import RULES, Cost, rank_key
from pruning.search import SEARCHES
from pruning.stability import held, held_table
from utils.errors import KitError
from utils.text import format_table

if TYPE_CHECKING:
    from pruning.calibration import Calibration

log = logging.getLogger("gpt2-pruning-kit")

# The scoring rules (pruning.rules), the searches (pruning.search), then the two references.
COMPARED = (*RULES, *SEARCHES, "random", "last")


def units_in(removal: Removal, kind: str) -> int:
    """How many --unit candidates a set removes: a whole block is two units when the candidates are sublayers."""
    return sublayers_in(removal) if kind == "sublayer" else len(removal)


@dataclass(frozen=True)
class CompareSets:
    units: tuple[Unit, ...]  # the candidates: blocks, or sublayers (--unit)
    kind: str  # --unit
    chosen: dict[int, dict[str, Removal]]  # k -> rule -> the set it removes
    exhaustive: dict[int, tuple[Removal, ...]]  # k -> every valid k-unit set, for the k with at most --max-configs
    unit_scores: dict[str, list[float]]  # scoring rule -> its score of each unit alone
    costs: dict[int, dict[str, Cost]]  # k -> rule or search -> what choosing its set cost it alone

    def size(self, removal: Removal) -> int:
        return units_in(removal, self.kind)

    def removals(self) -> list[Removal]:
        """Every set to evaluate, once: single removals, the rules' sets, then the exhaustive subsets."""
        sets = [canonical([u]) for u in self.units]
        for k, by_rule in self.chosen.items():
            sets += by_rule.values()
            sets += self.exhaustive.get(k, ())
        return list(dict.fromkeys(sets))

    def roles(self, removed: Removal) -> list[str]:
        k = self.size(removed)
        roles = [rule for rule, s in self.chosen.get(k, {}).items() if s == removed]
        if k in self.exhaustive:
            roles.append("exhaustive")
        elif k == 1:
            roles.append("single")
        return roles


def compare_sets(config: RunConfig, calib: "Calibration") -> CompareSets:
    select, n_blocks, units = config.select, calib.n_blocks, tuple(calib.units)
    n = len(units)
    high = n - 1 if select.max_remove is None else select.max_remove
    if not 1 <= high < n:
        what = f"a {n}-block model" if select.unit == "block" else f"the {n} {select.unit} units of this model"
        raise KitError(f"--max-remove must be between 1 and {n - 1} for {what} (got {high})")
    names = names_for(select.unit)
    found = {name: picks(name, calib, select, high) for name in names}
    costs = {k: {name: found[name][k].cost for name in names if k in found[name]} for k in range(1, high + 1)}
    rules = [name for name in names if name in RULES]
    chosen = {}
    for k in range(1, high + 1):
        by_rule = {name: found[name][k].removal for name in names if k in found[name]}
        by_rule["random"] = random_units(config.seed, units, k)
        by_rule["last"] = units[n - k :]
        # a reference is left out at a k where its set would remove every attention (possible with sublayers)
        chosen[k] = {rule: valid[0] for rule, s in by_rule.items() if (valid := valid_sets([s], n_blocks))}
    exhaustive = {k: tuple(valid_sets(combinations(units, k), n_blocks))
                  for k in chosen if math.comb(n, k) <= select.max_configs}
    # every rule's score of each unit alone (a span of one unit, for angular)
    unit_scores = {name: [RULES[name].scores(calib, 1)[canonical([u])] for u in units] for name in rules}
    return CompareSets(units, select.unit, chosen, exhaustive, unit_scores, costs)


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


def best_found(plan: CompareSets, k: int, ppl: Callable[[Removal], float]) -> tuple[str, Removal] | None:
    """The search whose set at k has the lowest evaluation perplexity, and that set."""
    found = [(name, s) for name, s in plan.chosen.get(k, {}).items() if name in SEARCHES]
    return min(found, key=lambda f: rank_key(ppl(f[1]), f[1])) if found else None


def compare_report(plan: CompareSets, rows: list[dict], beam_width: int) -> str:
    """The rules-against-optimum table (or against the best set found), each rule's summary, and the score
    correlations."""
    by_key = {config_key(row_removal(r), r.get("patch")): r for r in rows}
    ppl = lambda s: by_key[removal_key(s)]["perplexity"]
    base = by_key[removal_key(())]["perplexity"]
    # --patch: each rule's pick also evaluated with its fitted maps merged in
    method = next((r["patch"] for r in rows if r.get("patch") not in (None, "", "none")), None)
    patched = (lambda s: _cell(by_key[config_key(s, method)]["perplexity"], ",.2f")) if method else None
    body, gaps, found_gaps = [], {rule: [] for rule in COMPARED}, {rule: [] for rule in COMPARED}
    for k, by_rule in plan.chosen.items():
        reference, into = None, gaps
        if plan.exhaustive.get(k):
            reference = min(plan.exhaustive[k], key=lambda s: rank_key(ppl(s), s))
            body.append([str(k), "optimum", removed_label(reference), _cell(ppl(reference), ",.2f"), "0.00",
                         f"{len(plan.exhaustive[k]):,} sets on evaluation tokens", *(["-"] if patched else [])])
        elif (best := best_found(plan, k, ppl)) is not None:
            search, reference = best
            into = found_gaps
            body.append([str(k), "best found", removed_label(reference), _cell(ppl(reference), ",.2f"), "0.00",
                         f"{search}: {plan.costs[k][search]}", *(["-"] if patched else [])])
        for rule, s in by_rule.items():
            gap = (ppl(s) - ppl(reference)) / ppl(reference) * 100 if reference is not None else None
            if gap is not None:
                into[rule].append(gap)
            cost = plan.costs[k].get(rule)
            body.append([str(k), rule, removed_label(s), _cell(ppl(s), ",.2f"), _cell(gap, "+,.2f"),
                         str(cost) if cost is not None else "-", *([patched(s)] if patched else [])])
    table = format_table(["k", "Rule", "Removed", "Perplexity", "Gap (%)", "Choosing cost",
                          *([f"Patched ({method})"] if patched else [])], body)

    mean = lambda g: _cell(sum(g) / len(g), "+,.2f") if g else "-"
    k_opt, k_found = len(plan.exhaustive), sum(1 for k in plan.chosen if k not in plan.exhaustive)
    head = ["Rule", f"At optimum (of {k_opt} k)", "Mean gap (%)", "Max gap (%)"]
    if k_found:
        head += [f"Mean gap to best found (of {k_found} k, %)"]
    summary = format_table(head, ([rule, str(sum(g <= 0 for g in gaps[rule])) if gaps[rule] else "-",
                                   mean(gaps[rule]), _cell(max(gaps[rule]), "+,.2f") if gaps[rule] else "-",
                                   *([mean(found_gaps[rule])] if k_found else [])] for rule in COMPARED))

    increase = [ppl(canonical([u])) - base for u in plan.units]
    corr = ", ".join(f"{m} {_cell(spearman(scores, increase), '+.3f')}" for m, scores in plan.unit_scores.items())
    skipped = [k for k in plan.chosen if k not in plan.exhaustive]
    what = "blocks" if plan.kind == "block" else f"{plan.kind} units"
    notes = [f"Rules chose on calibration tokens; every perplexity here is on the evaluation tokens "
             f"(baseline {base:,.2f}). beam width {beam_width}. The gap is to the optimum, or where there is none "
             "to the best set found."]
    if plan.kind == "sublayer":
        notes.append("k counts sublayers: a whole block removed is two (its attention and its MLP).")
    if patched:
        notes.append(f"Patched: the rule's pick with a {method} map fitted on the calibration tokens for each removed "
                     "run and merged into the weights (--patch); the optimum and gaps are without it.")
    if skipped:
        notes.append(f"No exhaustive optimum for k = {', '.join(map(str, skipped))} (more than --max-configs "
                     "subsets): the reference there is the best set found by a search (greedy, beam, evolve), "
                     "an upper bound on the optimum.")
    notes.append(f"Spearman correlation of each one-pass score with the true single-removal perplexity increase "
                 f"over {len(plan.units)} {what}: {corr}")
    return "\n\n".join(["Rules against the exhaustive optimum", table, summary, *notes])


def compare(config: RunConfig, calib: "Calibration") -> Choice:
    if config.select.target_params is not None or config.select.target_speedup is not None:
        return compare_granularity(config, calib)  # whole blocks against sublayers at equal size or speed
    plan = compare_sets(config, calib)
    names = names_for(config.select.unit)
    info = choosing_info(config, calib, {n: {k: c[n] for k, c in plan.costs.items() if n in c} for n in names})
    stability = ""
    if config.select.calib_slices > 1:
        rows = held(calib, config.select, names, max(plan.chosen))
        info["stability"] = [h.as_dict() for h in rows]
        stability = "\n\n" + held_table(rows, len(calib.ids))
    removals = plan.removals()
    extras = {}
    position = {canonical([u]): i for i, u in enumerate(plan.units)}
    for s in removals:
        extras[s] = {"metric": ",".join(plan.roles(s))}
        if s in position:
            extras[s]["scores"] = json.dumps({m: scores[position[s]] for m, scores in plan.unit_scores.items()})
    picks = list(dict.fromkeys(s for by_rule in plan.chosen.values() for s in by_rule.values()))
    return Choice(removals, extras, lambda rows: compare_report(plan, rows, config.select.beam_width) + stability,
                  sweep_table=False, patched=picks, info=info)
