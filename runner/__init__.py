"""The top floor: a RunConfig in, results files out.

runner.evaluate runs the modes that evaluate a model, in stages; runner.report
and runner.merge the two that work on results files. Which one a mode takes is
its registry entry's ``action`` (pruning.modes).
"""

from __future__ import annotations

from config import RunConfig
from pruning.modes import MODES
from runner import evaluate, merge, report

ACTIONS = {"evaluate": evaluate.run, "report": report.run, "merge": merge.run}


def run(config: RunConfig) -> int:
    return ACTIONS[MODES[config.mode].action](config)
