"""Modes that choose blocks by looking at the model on calibration tokens.

A chooser gets the run's config and a Calibration (the model and its
calibration tokens) and returns a Choice: the removal sets to evaluate, what
to record with each row (the rule in ``metric``, the candidates it scored in
``scores``), and its own report. Registered in runner.modes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from config import RunConfig
from models.units import is_whole_blocks, removed_label
from pruning.budget import Budget, target_label
from pruning.choice import Choice, scores_json, scores_table
from pruning.plans import removal_count
from pruning.picks import Pick, picks
from pruning.rules import RULES
from pruning.search import SEARCHES, Step
from utils.errors import KitError
from utils.text import format_table

if TYPE_CHECKING:
    from pruning.calibration import Calibration


def how_many(config: RunConfig, calib: "Calibration") -> int:
    """Units to remove: --num-remove or --ratio, or with a budget the most a search may try."""
    if Budget(calib, config.select).active:
        return len(calib.units) - 1
    return removal_count(config.select, calib.n_blocks)


def extras(config: RunConfig, metric: str, scores: dict) -> dict:
    """The CSV columns a chosen set carries: the rule, the candidates it scored, any budget it met."""
    return {"metric": metric, "scores": scores_json(scores), "target": target_label(config.select)}


def chosen(name: str, config: RunConfig, calib: "Calibration") -> dict[int, Pick]:
    """The picks of rule or search ``name`` up to --num-remove (or --ratio), or up to the budget."""
    budget, k = Budget(calib, config.select), how_many(config, calib)
    found = picks(name, calib, config.select, k, stop=budget.met if budget.active else None)
    if not budget.active and k not in found:
        raise KitError(f"{name}'s {k} units would remove every attention; remove fewer or choose another --unit")
    return found


def importance(config: RunConfig, calib: "Calibration") -> Choice:
    rule = RULES[config.select.rule]
    found = chosen(rule.name, config, calib)
    pick = found[max(found)]
    title = f"{rule.title} on {len(calib.ids):,} calibration tokens (lower: removed first)"
    return Choice([pick.removal], {pick.removal: extras(config, rule.name, pick.scores)},
                  lambda rows: f"{title}\n\n{scores_table(pick.scores, pick.removal, rule.title)}")


def steps_table(steps: list[Step]) -> str:
    noun = "Blocks" if all(is_whole_blocks(s.removed) for s in steps) else "Units"
    return format_table([f"{noun} removed", "Removed", "Calibration PPL", "Sets scored"],
                        ([str(n), removed_label(s.removed), f"{s.score:.4f}", str(len(s.candidates))]
                         for n, s in enumerate(steps, start=1)))


def greedy_mode(config: RunConfig, calib: "Calibration") -> Choice:
    steps = [p.step for p in chosen("greedy", config, calib).values()]
    return Choice([s.removed for s in steps], {s.removed: extras(config, "greedy", s.candidates) for s in steps},
                  lambda rows: f"{SEARCHES['greedy'].title} on calibration tokens\n\n" + steps_table(steps))


def beam_mode(config: RunConfig, calib: "Calibration") -> Choice:
    width = SEARCHES["beam"].width(config.select)
    steps = [p.step for p in chosen("beam", config, calib).values()]
    best = steps[-1]
    return Choice([best.removed], {best.removed: extras(config, "beam", best.candidates)},
                  lambda rows: f"Beam search (width {width}) on calibration tokens: best set per size\n\n"
                  + steps_table(steps))
