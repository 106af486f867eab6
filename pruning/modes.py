"""The modes of the command line, one registry entry each.

An entry says how the mode gets its configurations (``plan``: from the depth
alone; ``choose``: by looking at the model on calibration tokens), which of
the mode-specific options it reads, and whether its result is one chosen
configuration that can be healed and saved. main.py derives --mode's choices,
the help of the mode-specific options and the "only used by" checks from it;
the run (runner.evaluate) asks it what to do. report and merge read results
files instead of evaluating a model.

Add a mode with one function (in pruning.plans or pruning.choosers) and one
entry here, plus a test that runs it through main.main.

Importing this module loads no torch, so `main.py --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from config import RunConfig
from models.units import Removal
from pruning import choosers, plans
from pruning.choice import Choice
from pruning.compare import compare

if TYPE_CHECKING:
    from pruning.calibration import Calibration

# Options that only some modes read: argparse destination -> flag.
MODE_OPTIONS = {
    "remove": "--remove", "min_remove": "--min-remove", "max_remove": "--max-remove", "ratio": "--ratio",
    "num_remove": "--num-remove", "metric": "--metric", "beam_width": "--beam-width",
    "calib_tokens": "--calib-tokens", "max_configs": "--max-configs", "input": "--input", "inputs": "--inputs",
    "allow_partial": "--allow-partial", "unit": "--unit", "target_params": "--target-params",
    "target_speedup": "--target-speedup",
}
HOW_MANY = frozenset({"ratio", "num_remove", "unit"})
BUDGETS = frozenset({"target_params", "target_speedup"})
CALIBRATED = frozenset({"calib_tokens"})


@dataclass(frozen=True)
class Mode:
    name: str
    help: str
    plan: Callable[[RunConfig, int], list[Removal]] | None = None
    choose: Callable[[RunConfig, "Calibration"], Choice] | None = None
    options: frozenset[str] = frozenset()  # the MODE_OPTIONS it reads
    saves: bool = False  # its last row is the configuration it settles on: --heal-steps and --save-model apply
    action: str = "evaluate"  # evaluate a model, or (report, merge) work on results files
    needs: tuple[tuple[str, str], ...] = ()  # (option, what to say when it is missing)
    removes: bool = True  # evaluates configurations with blocks removed (not only the baseline)
    seeded: bool = False  # --seed changes which configurations it evaluates

    @property
    def calibrates(self) -> bool:
        return self.choose is not None

    @property
    def evaluates(self) -> bool:
        return self.action == "evaluate"


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("baseline", "the unpruned model", plan=plans.baseline, removes=False),
    Mode("sequential", "each single block (or --unit) removed in turn", plan=plans.sequential,
         options=frozenset({"unit"})),
    Mode("combinatorial", "every set of --min-remove..--max-remove blocks (or --unit)", plan=plans.combinatorial,
         options=frozenset({"min_remove", "max_remove", "max_configs", "unit"})),
    Mode("random", "randomly drawn blocks (--seed)", plan=plans.random_removal, options=HOW_MANY, saves=True,
         seeded=True),
    Mode("custom", "the blocks in --remove", plan=plans.custom, options=frozenset({"remove"}), saves=True),
    Mode("importance", "the blocks a --metric scores lowest on calibration tokens", choose=choosers.importance,
         options=HOW_MANY | CALIBRATED | BUDGETS | {"metric"}, saves=True, seeded=True),
    Mode("greedy", "iterative elimination by calibration perplexity (SLEB)", choose=choosers.greedy_mode,
         options=HOW_MANY | CALIBRATED | BUDGETS, saves=True, seeded=True),
    Mode("beam", "beam search by calibration perplexity", choose=choosers.beam_mode,
         options=HOW_MANY | CALIBRATED | BUDGETS | {"beam_width"}, saves=True, seeded=True),
    Mode("compare", "every rule's choice against the exhaustive optimum (with --target-params or "
         "--target-speedup: whole blocks against sublayers at equal size or speed)", choose=compare,
         options=CALIBRATED | BUDGETS | {"max_remove", "beam_width", "max_configs", "unit"}, seeded=True),
    Mode("report", "figures and report.md again from --input", action="report", options=frozenset({"input"}),
         needs=(("input", "--mode report needs --input RESULTS.csv (a CSV written with --save_results)"),)),
    Mode("merge", "join the results files of --shard runs (--inputs)", action="merge",
         options=frozenset({"inputs", "allow_partial"}), needs=(("inputs", "--mode merge needs --inputs A.csv B.csv ..."),)),
)}


def users(option: str) -> list[str]:
    """The modes that read a mode-specific option, in registry order."""
    return [m.name for m in MODES.values() if option in m.options]


def saving_modes() -> list[str]:
    return [m.name for m in MODES.values() if m.saves]


def either(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
