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

from utils.errors import WriteError
from utils.files import replace_text
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
        "libraries": dict(library_versions()),
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
    write_json_atomic(path, record)
    return path


def read_sidecar(csv_path: str) -> dict | None:
    """The sidecar of ``csv_path`` as written, or None when it is missing or unreadable."""
    try:
        with open(sidecar_path(csv_path), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON in one step (utils.files): a crash leaves the old file or the new
    one, never a mix, a failure (disk full) leaves no temporary file, and a link at ``path`` is replaced, not
    followed."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    try:
        replace_text(path, text)
    except OSError as exc:
        raise WriteError(f"cannot write '{path}': {exc.strerror}; the results file beside it is intact") from None
