"""Modes that choose blocks by looking at the model on calibration tokens.

PLANNERS (pruning.strategies) know only the depth; a CHOOSER also gets a
Calibration (the model and its calibration tokens) and returns a Choice: the
removal sets to evaluate, what to record with each row (the rule in
``metric``, the candidates it scored in ``scores``), and its own report.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Callable

from pruning.choice import Choice, scores_json, scores_table
from pruning.compare import compare
from pruning.importance import Calibration, candidate_scores, choose
from pruning.search import Step, beam, greedy
from pruning.strategies import removal_count
from utils.results import format_table, removed_label


SCORE_NAMES = {"bi": "Block Influence", "angular": "Angular distance", "ppl": "Calibration PPL"}


def importance(args: Namespace, calib: Calibration) -> Choice:
    k = removal_count(args, calib.n_blocks)
    scores = candidate_scores(calib, args.metric, k)
    chosen = choose(args.metric, scores, k)
    title = f"{SCORE_NAMES[args.metric]} on {len(calib.ids):,} calibration tokens (lower: removed first)"
    return Choice([chosen], {chosen: {"metric": args.metric, "scores": scores_json(scores)}},
                  lambda rows: f"{title}\n\n{scores_table(scores, chosen, SCORE_NAMES[args.metric])}")


def steps_table(steps: list[Step]) -> str:
    return format_table(["Blocks removed", "Removed", "Calibration PPL", "Sets scored"],
                        ([str(len(s.removed)), removed_label(s.removed), f"{s.score:.4f}", str(len(s.candidates))]
                         for s in steps))


def greedy_mode(args: Namespace, calib: Calibration) -> Choice:
    steps = greedy(calib.perplexities, calib.n_blocks, removal_count(args, calib.n_blocks), calib.progress)
    return Choice([s.removed for s in steps],
                  {s.removed: {"metric": "greedy", "scores": scores_json(s.candidates)} for s in steps},
                  lambda rows: "Greedy elimination on calibration tokens (SLEB)\n\n" + steps_table(steps))


def beam_mode(args: Namespace, calib: Calibration) -> Choice:
    steps = beam(calib.perplexities, calib.n_blocks, removal_count(args, calib.n_blocks), args.beam_width,
                 calib.progress)
    best = steps[-1]
    return Choice([best.removed], {best.removed: {"metric": "beam", "scores": scores_json(best.candidates)}},
                  lambda rows: f"Beam search (width {args.beam_width}) on calibration tokens: best set per size\n\n"
                  + steps_table(steps))


CHOOSERS: dict[str, Callable[[Namespace, Calibration], Choice]] = {
    "importance": importance,
    "greedy": greedy_mode,
    "beam": beam_mode,
    "compare": compare,
}
