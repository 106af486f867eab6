"""The top floor: a RunConfig in, results files out.

runner.evaluate runs the modes that evaluate a model, in stages; runner.report
and runner.merge the two that work on results files. Which one a mode takes is
its registry entry's ``action`` (runner.modes). The stages are imported when a
run starts, so that the parser (runner.options) loads no torch.
"""

from __future__ import annotations

from config import RunConfig
from runner.modes import MODES


def run(config: RunConfig) -> int:
    from runner import evaluate, merge, report

    actions = {"evaluate": evaluate.run, "report": report.run, "merge": merge.run}
    return actions[MODES[config.mode].action](config)
