"""The JSON sidecar beside every results CSV: what produced the file (the run's
config, library versions, kit commit, device) and what the run cost, so any
CSV can be reproduced and two CSVs compared.

A resumed CSV keeps the sidecars of its earlier runs under "previous_runs":
its rows came from all of them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from typing import Any

from utils.metadata import git_state, library_versions

log = logging.getLogger("gpt2-pruning-kit")


def sidecar_path(csv_path: str) -> str:
    return os.path.splitext(csv_path)[0] + ".json"


def build_metadata(config: dict[str, Any], run_info: dict[str, Any]) -> dict[str, Any]:
    """One run's record: its config (RunConfig.to_dict) and what the run measured (times, device, tokens, work)."""
    return {
        "config": config,
        **run_info,
        "work": run_info.get("work"),
        "libraries": library_versions(),
        "kit": git_state(),
        "platform": platform.platform(),
    }


def write_sidecar(csv_path: str, config: dict[str, Any], run_info: dict[str, Any]) -> str:
    """Write (or update, when called again in the same run) the sidecar of ``csv_path``."""
    path = sidecar_path(csv_path)
    record = build_metadata(config, run_info)
    previous: list[dict] = []
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except ValueError:
            log.warning(f"Replacing unreadable metadata file {path}")
            old = {}
        previous = old.pop("previous_runs", [])
        if old and old.get("started") != record.get("started"):  # an earlier run of a resumed file
            previous.append(old)
    if previous:
        record["previous_runs"] = previous
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path
