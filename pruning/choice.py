"""What a choosing mode hands the run, and how rules' scores are shown and saved."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from models.units import SUBLAYERS, Removal, removal_key, removed_label, removed_whole, unit_names
from pruning.rules import ranked
from utils.text import format_table


@dataclass(frozen=True)
class Choice:
    removals: list[Removal]
    extras: dict[Removal, dict] = field(default_factory=dict)  # extra CSV columns per removal set
    report: Callable[[list[dict]], str] | None = None  # printed after the runs, given all rows
    sweep_table: bool = True  # also print the usual table of every row
    # The sets that --patch evaluates patched as well as plain (compare: each rule's pick); None: every set,
    # patched only.
    patched: list[Removal] | None = None
    info: dict = field(default_factory=dict)  # what choosing cost and how it ranked, for the sidecar


def scores_json(scores: dict[Removal, float]) -> str:
    """Candidates and scores as a JSON object keyed by removal set, e.g. {"[2]": 0.0, "[0]": 0.31}."""
    return json.dumps({removal_key(c): s for c, s in scores.items()})


def scores_table(scores: dict[Removal, float], chosen: Removal, header: str) -> str:
    gone = set(unit_names(chosen)) | {f"{kind}{i}" for i in removed_whole(chosen) for kind in SUBLAYERS}
    return format_table(["Candidate", header, "Removed"],
                        ([removed_label(c), f"{scores[c]:.6g}", "yes" if set(unit_names(c)) <= gone else ""]
                         for c in ranked(scores)))
