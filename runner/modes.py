"""The modes of the command line, one registry entry each.

An entry says how the mode gets its configurations (``plan``: from the depth
alone; ``choose``: by looking at the model on calibration tokens), whether its
result is one chosen configuration that can be healed and saved, and how its
output is laid out. Which options a mode reads is declared with each option
(runner.options). report and merge read results files instead of evaluating
a model.

Add a mode with one function (in pruning.plans or pruning.choosers), one
entry here, the mode's name in the ``modes`` of each option it reads, and a
test that runs it through main.main. Importing this module loads no torch.
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


@dataclass(frozen=True)
class Mode:
    name: str
    help: str
    plan: Callable[[RunConfig, int], list[Removal]] | None = None
    choose: Callable[[RunConfig, "Calibration"], Choice] | None = None
    saves: bool = False  # its last row is the configuration it settles on: --heal-steps and --save-model apply
    action: str = "evaluate"  # evaluate a model, or (report, merge) work on results files
    needs: tuple[tuple[str, str], ...] = ()  # (option, what to say when it is missing)
    removes: bool = True  # evaluates configurations with blocks removed (not only the baseline)
    seeded: bool = False  # --seed changes which configurations it evaluates
    budgets: bool = False  # takes several --target-params budgets and sets whole blocks against sublayers itself
    comparison: bool = False  # prints the baseline beside its one pruned model, as the seed kit did
    first_header: str | None = None  # the sweep table's first column, where not "Configuration"

    @property
    def calibrates(self) -> bool:
        return self.choose is not None

    @property
    def evaluates(self) -> bool:
        return self.action == "evaluate"


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("baseline", "the unpruned model", plan=plans.baseline, removes=False),
    Mode("sequential", "each single block (or --unit) removed in turn", plan=plans.sequential,
         first_header="Layer Removed"),
    Mode("combinatorial", "every set of --min-remove..--max-remove blocks (or --unit)", plan=plans.combinatorial),
    Mode("random", "randomly drawn blocks (--seed)", plan=plans.random_removal, saves=True, seeded=True,
         comparison=True),
    Mode("custom", "the blocks in --remove", plan=plans.custom, saves=True),
    Mode("importance", "the blocks a --metric scores lowest on calibration tokens", choose=choosers.importance,
         saves=True, seeded=True),
    Mode("greedy", "iterative elimination by calibration perplexity (SLEB)", choose=choosers.greedy_mode,
         saves=True, seeded=True),
    Mode("beam", "beam search by calibration perplexity", choose=choosers.beam_mode, saves=True, seeded=True),
    Mode("evolve", "evolutionary search over sets of --num-remove blocks (EvoPress)", choose=choosers.evolve_mode,
         saves=True, seeded=True),
    Mode("compare", "every rule's choice against the exhaustive optimum (with --target-params or "
         "--target-speedup: whole blocks against sublayers at equal size or speed)", choose=compare,
         seeded=True, budgets=True),
    Mode("report", "figures and report.md again from --input", action="report",
         needs=(("input", "--mode report needs --input RESULTS.csv (a CSV written with --save_results)"),)),
    Mode("merge", "join the results files of --shard runs (--inputs)", action="merge",
         needs=(("inputs", "--mode merge needs --inputs A.csv B.csv ..."),)),
)}


def saving_modes() -> list[str]:
    return [m.name for m in MODES.values() if m.saves]


def either(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
