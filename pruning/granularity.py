"""Which granularity loses less at a given size or speed: whole blocks or sublayers?

`--mode compare --target-params 0.8` (several budgets: 0.9,0.8) answers it in
one run, at equal size; `--mode compare --target-speedup 1.3` at equal measured
prefill speed. For each budget and each granularity (whole blocks; attention and
MLP sublayers, --unit sublayer) every rule (bi, angular, ppl, greedy, beam)
removes units in its own order until the budget is met (pruning.budget);
the run then evaluates every chosen set on the evaluation tokens, and the
report puts, per budget, the best block-only set against the best sublayer
set. BlockPruner (Zhong et al., 2024) reports that sublayers
lose much less at equal size on Llama-2; this measures it on your model.

Choosing costs calibration evaluations: ppl one per candidate unit (L
blocks, 2L sublayers), greedy and beam as in pruning.search, run until the
budget is met; bi and angular share one calibration pass for every budget
and both granularities. Calibration perplexities are cached across
granularities (the same set is scored once).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from config import RunConfig, SelectSpec
from models.units import Removal, removal_key, removed_label, row_removal
from pruning.budget import Budget, parse_params_target, target_label
from pruning.choice import Choice
from pruning.picks import at_budget, names_for
from utils.text import format_table

if TYPE_CHECKING:
    from pruning.calibration import Calibration

GRANULARITIES = ("block", "sublayer")


@dataclass(frozen=True)
class GranularitySets:
    specs: dict[str, SelectSpec]  # budget label ('0.8' of the params, '1.3x' prefill speed-up) -> its settings
    chosen: dict[tuple[str, str, str], Removal]  # (budget, granularity, rule) -> the set it removes
    costs: dict[tuple[str, str, str], str]  # what choosing it cost, in calibration evaluations (or passes)

    def removals(self) -> list[Removal]:
        return list(dict.fromkeys(self.chosen.values()))

    def roles(self, removal: Removal) -> str:
        return ",".join(f"{g} {rule} @{b}" for (b, g, rule), s in self.chosen.items() if s == removal)


def _choices(calib: "Calibration", budget: Budget, select: SelectSpec) -> dict[str, tuple[Removal, str]]:
    """Each rule's and search's fewest units meeting ``budget`` at the calibration's granularity, and what
    choosing it costs on its own (the run shares one cache, so it pays less)."""
    out = {}
    for name in names_for(calib.unit):
        pick = at_budget(name, calib, select, budget.met)
        out[name] = (pick.removal, str(pick.cost))
    return out


def budget_specs(select: SelectSpec) -> dict[str, SelectSpec]:
    """Budget label -> settings: one per --target-params budget, or the one --target-speedup."""
    if select.target_params is None:
        return {f"{select.target_speedup}x": select}
    budgets = [b.strip() for b in select.target_params.split(",") if b.strip()]
    for b in budgets:
        parse_params_target(b)
    return {b: replace(select, target_params=b) for b in budgets}


def granularity_sets(config: RunConfig, calib: "Calibration") -> GranularitySets:
    specs = budget_specs(config.select)
    chosen, costs = {}, {}
    for b, spec in specs.items():
        for g in GRANULARITIES:
            at = calib.at(g)  # shares the tokens, the cached perplexities and the one-pass scores
            budget = Budget(at, replace(spec, unit=g))
            for rule, (removal, cost) in _choices(at, budget, spec).items():
                chosen[(b, g, rule)], costs[(b, g, rule)] = removal, cost
    return GranularitySets(specs, chosen, costs)


def granularity_report(plan: GranularitySets, rows: list[dict]) -> str:
    by_key = {removal_key(row_removal(r)): r for r in rows}
    base = by_key[removal_key(())]
    row = lambda s: by_key[removal_key(s)]
    body, best_lines = [], []
    for b in plan.specs:
        best = {}
        for g in GRANULARITIES:
            for (budget, gran, rule), s in plan.chosen.items():
                if (budget, gran) != (b, g):
                    continue
                r = row(s)
                body.append([b, g, rule, removed_label(s), f"{r['params'] / base['params'] * 100:.1f}",
                             f"{r['perplexity']:,.2f}", plan.costs[(budget, gran, rule)]])
                if g not in best or r["perplexity"] < best[g][1]["perplexity"]:
                    best[g] = (rule, r, s)
        (rb, block_row, sb), (rs, sub_row, ss) = best["block"], best["sublayer"]
        gap = (block_row["perplexity"] - sub_row["perplexity"]) / sub_row["perplexity"] * 100
        verdict = ("both lose the same" if gap == 0 else
                   f"{'sublayers' if gap > 0 else 'whole blocks'} lose less (the best block set's PPL is "
                   f"{gap:+.1f}% against the best sublayer set's)")
        best_lines.append(f"At {target_label(plan.specs[b])}: best block set {removed_label(sb)} ({rb}, PPL "
                          f"{block_row['perplexity']:,.2f}), best sublayer set {removed_label(ss)} ({rs}, PPL "
                          f"{sub_row['perplexity']:,.2f}): {verdict}")
    table = format_table(["Budget", "Units", "Rule", "Removed", "Params (%)", "Perplexity", "Calibration cost"],
                         body)
    equal = "prefill speed-up" if any(s.target_params is None for s in plan.specs.values()) else "parameter budgets"
    return "\n\n".join([f"Whole blocks against sublayers at equal {equal} (baseline PPL "
                        f"{base['perplexity']:,.2f}; rules chose on calibration tokens, perplexities on the "
                        "evaluation tokens)", table, "\n".join(best_lines)])


def compare_granularity(config: RunConfig, calib: "Calibration") -> Choice:
    plan = granularity_sets(config, calib)
    extras = {s: {"metric": plan.roles(s), "target": target_label(config.select)} for s in plan.removals()}
    return Choice(plan.removals(), extras, lambda rows: granularity_report(plan, rows), sweep_table=False)
