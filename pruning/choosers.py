"""Modes that choose blocks by looking at the model on calibration tokens.

A chooser gets the run's config and a Calibration (the model and its
calibration tokens) and returns a Choice: the removal sets to evaluate, what
to record with each row (the rule in ``metric``, the candidates it scored in
``scores``), and its own report. Registered in pruning.modes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from config import RunConfig
from models.units import is_whole_blocks
from pruning.choice import Choice, scores_json, scores_table
from pruning.plans import removal_count
from pruning.rules import RULES, choose
from pruning.search import Step, beam, greedy
from utils.text import format_table, removed_label

if TYPE_CHECKING:
    from pruning.calibration import Calibration


def importance(config: RunConfig, calib: "Calibration") -> Choice:
    rule = RULES[config.select.metric]
    chosen, scores = choose(rule, calib, removal_count(config.select, calib.n_blocks))
    title = f"{rule.title} on {len(calib.ids):,} calibration tokens (lower: removed first)"
    return Choice([chosen], {chosen: {"metric": rule.name, "scores": scores_json(scores)}},
                  lambda rows: f"{title}\n\n{scores_table(scores, chosen, rule.title)}")


def steps_table(steps: list[Step]) -> str:
    noun = "Blocks" if all(is_whole_blocks(s.removed) for s in steps) else "Units"
    return format_table([f"{noun} removed", "Removed", "Calibration PPL", "Sets scored"],
                        ([str(n), removed_label(s.removed), f"{s.score:.4f}", str(len(s.candidates))]
                         for n, s in enumerate(steps, start=1)))


def greedy_mode(config: RunConfig, calib: "Calibration") -> Choice:
    steps = greedy(calib.perplexities, calib.n_blocks, removal_count(config.select, calib.n_blocks), calib.progress,
                   units=calib.units)
    return Choice([s.removed for s in steps],
                  {s.removed: {"metric": "greedy", "scores": scores_json(s.candidates)} for s in steps},
                  lambda rows: "Greedy elimination on calibration tokens (SLEB)\n\n" + steps_table(steps))


def beam_mode(config: RunConfig, calib: "Calibration") -> Choice:
    width = config.select.beam_width
    steps = beam(calib.perplexities, calib.n_blocks, removal_count(config.select, calib.n_blocks), width,
                 calib.progress, units=calib.units)
    best = steps[-1]
    return Choice([best.removed], {best.removed: {"metric": "beam", "scores": scores_json(best.candidates)}},
                  lambda rows: f"Beam search (width {width}) on calibration tokens: best set per size\n\n"
                  + steps_table(steps))
