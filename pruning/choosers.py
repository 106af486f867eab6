"""Modes that choose blocks by looking at the model on calibration tokens.

A chooser gets the run's config and a Calibration (the model and its
calibration tokens) and returns a Choice: the removal sets to evaluate, what
to record with each row (the rule in ``metric``, the candidates it scored in
``scores``), its own report, and for the sidecar what choosing cost (and,
with --calib-slices, how the choice holds across slices, pruning.stability).
Registered in runner.modes.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from config import RunConfig
from models.units import is_whole_blocks, removed_label
from pruning.budget import Budget, target_label
from pruning.choice import Choice, scores_json, scores_table
from pruning.plans import removal_count
from pruning.picks import Pick, picks
from pruning.race import PLAIN_RULE, RACE_RULE
from pruning.rules import RULES, Cost
from pruning.search import SEARCHES, Step
from pruning.stability import held, held_table
from utils.errors import KitError
from utils.text import format_table

if TYPE_CHECKING:
    from pruning.calibration import Calibration

log = logging.getLogger("gpt2-pruning-kit")


def how_many(config: RunConfig, calib: "Calibration") -> int:
    """Units to remove: --num-remove or --ratio, or with a budget the most a search may try."""
    if Budget(calib, config.select).active:
        return len(calib.units) - 1
    return removal_count(config.select, calib.n_blocks)


def extras(config: RunConfig, metric: str, scores: dict) -> dict:
    """The CSV columns a chosen set carries: the rule, the candidates it scored, any budget it met."""
    return {"metric": metric, "scores": scores_json(scores), "target": target_label(config.select)}


def ranking_rule(name: str, config: RunConfig) -> str:
    """How a search ranked each step's candidates (pruning.race); a rule scores on all tokens."""
    patched = (f"; every candidate scored with its own --patch {config.select.patch} fitted on the calibration "
               "tokens" if config.select.choose_patched else "")
    if name == "evolve":
        return f"offspring by {RACE_RULE}; seeds and greedy's steps by " + (RACE_RULE if config.select.race
                                                                           else PLAIN_RULE) + patched
    return (RACE_RULE if name in SEARCHES and config.select.race else PLAIN_RULE) + patched


def choosing_info(config: RunConfig, calib: "Calibration", costs: dict[str, dict[int, Cost]]) -> dict:
    """For the log and the sidecar: what each rule or search spent alone at each k, how it ranked,
    and the calibration work the run did (the cache shares sets between them)."""
    work = calib.cache.work()
    info = {"calibration_tokens": len(calib.ids), "calibration_work": work.as_dict(),
            "choosers": {name: {"ranking": ranking_rule(name, config),
                                "cost": {str(k): c.as_dict() for k, c in by_k.items()}}
                         for name, by_k in costs.items()}}
    for name, by_k in costs.items():
        if by_k:
            k = max(by_k)
            log.info(f"{name} at k = {k} alone: {by_k[k]} ({ranking_rule(name, config)})")
    log.info(f"Calibration work of the run: {work}")
    return info


def chosen(name: str, config: RunConfig, calib: "Calibration") -> dict[int, Pick]:
    """The picks of rule or search ``name`` at --num-remove (or --ratio), or up to the budget."""
    budget, k = Budget(calib, config.select), how_many(config, calib)
    stop = budget.met if budget.active else None
    found = picks(name, calib, config.select, k, stop=stop, only=None if stop else [k])
    if not budget.active and k not in found:
        raise KitError(f"{name}'s {k} units would remove every attention; remove fewer or choose another --unit")
    return found


def settled(name: str, choice: Choice, config: RunConfig, calib: "Calibration", found: dict[int, Pick]) -> Choice:
    """The Choice with its cost in ``info`` and, with --calib-slices, the stability report."""
    info = choosing_info(config, calib, {name: {k: p.cost for k, p in found.items()}})
    if config.select.calib_slices < 2:
        return replace(choice, info=info)
    budget, k = Budget(calib, config.select), how_many(config, calib)
    rows = held(calib, config.select, [name], k, stop=budget.met if budget.active else None,
                only=None if budget.active else [k])
    info["stability"] = [h.as_dict() for h in rows]
    text = held_table(rows, len(calib.ids))
    report = choice.report
    return replace(choice, info=info, report=lambda r: f"{report(r)}\n\n{text}" if report else text)


def importance(config: RunConfig, calib: "Calibration") -> Choice:
    rule = RULES[config.select.rule]
    found = chosen(rule.name, config, calib)
    pick = found[max(found)]
    title = f"{rule.title} on {len(calib.ids):,} calibration tokens (lower: removed first)"
    return settled(rule.name, Choice([pick.removal], {pick.removal: extras(config, rule.name, pick.scores)},
                                     lambda rows: f"{title}\n\n{scores_table(pick.scores, pick.removal, rule.title)}"),
                   config, calib, found)


def steps_table(steps: list[Step], label: Callable[[int, Step], str] | None = None) -> str:
    noun = "Blocks" if all(is_whole_blocks(s.removed) for s in steps) else "Units"
    first = f"{noun} removed" if label is None else "Step"
    return format_table([first, "Removed", "Calibration PPL", "Sets scored", "Tokens", "Block evals"],
                        ([str(n) if label is None else label(n, s), removed_label(s.removed), f"{s.score:.4f}",
                          str(s.scored), f"{s.cost.tokens:,}", f"{s.cost.block_evals:,}"]
                         for n, s in enumerate(steps, start=1)))


def greedy_mode(config: RunConfig, calib: "Calibration") -> Choice:
    found = chosen("greedy", config, calib)
    steps = [p.step for p in found.values()]
    title = f"{SEARCHES['greedy'].title} on calibration tokens ({ranking_rule('greedy', config)})"
    return settled("greedy", Choice([s.removed for s in steps],
                                    {s.removed: extras(config, "greedy", s.candidates) for s in steps},
                                    lambda rows: f"{title}\n\n" + steps_table(steps)), config, calib, found)


def beam_mode(config: RunConfig, calib: "Calibration") -> Choice:
    width = SEARCHES["beam"].width(config.select)
    found = chosen("beam", config, calib)
    steps = [p.step for p in found.values()]
    best = steps[-1]
    title = (f"Beam search (width {width}) on calibration tokens ({ranking_rule('beam', config)}): best set per "
             "size")
    return settled("beam", Choice([best.removed], {best.removed: extras(config, "beam", best.candidates)},
                                  lambda rows: f"{title}\n\n" + steps_table(steps)), config, calib, found)


def evolve_mode(config: RunConfig, calib: "Calibration") -> Choice:
    """A row for each generation's best set where it changed; the last row is the best set found."""
    found = chosen("evolve", config, calib)
    pick = found[max(found)]
    steps = list(pick.trail)
    removals = list(dict.fromkeys(s.removed for s in steps))
    rows_extras = {s.removed: extras(config, "evolve", s.candidates) for s in steps}
    select = config.select
    title = (f"{SEARCHES['evolve'].title} at {max(found)} units: {select.generations} generations of "
             f"{select.offspring} offspring, seeded with the rules' and greedy's sets (generation 0); "
             f"{ranking_rule('evolve', config)}. Cost: {pick.cost}")
    table = lambda rows: f"{title}\n\n" + steps_table(steps, lambda n, s: s.label)
    return settled("evolve", Choice(removals, rows_extras, table), config, calib, found)
