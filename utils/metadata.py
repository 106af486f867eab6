"""The JSON sidecar beside every results CSV: what produced the file (arguments,
library versions, kit commit, device) and what the run cost, so any CSV can be
reproduced and two CSVs compared.

A resumed CSV keeps the sidecars of its earlier runs under "previous_runs":
its rows came from all of them.
"""

from __future__ import annotations

import json
import os
import platform
import logging
import subprocess
from argparse import Namespace
from datetime import datetime
from importlib import metadata as importlib_metadata
from typing import Any

KIT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("gpt2-pruning-kit")
LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "safetensors", "accelerate", "numpy", "pandas",
             "matplotlib", "tqdm")


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="microseconds")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", KIT_ROOT, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The kit's commit, and whether its tracked files differ from it; None outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def device_name(device) -> str:
    """A name that tells two machines apart: the GPU model, or the CPU's."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return _cpu_model() or platform.processor() or platform.machine() or "cpu"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return None


def sidecar_path(csv_path: str) -> str:
    return os.path.splitext(csv_path)[0] + ".json"


def build_metadata(args: Namespace, run_info: dict[str, Any]) -> dict[str, Any]:
    """One run's record; ``run_info`` is what the pipeline measured (times, device, tokens, work)."""
    return {
        "arguments": vars(args),
        **run_info,
        "work": run_info.get("work"),
        "libraries": library_versions(),
        "kit": git_state(),
        "platform": platform.platform(),
    }


def write_sidecar(csv_path: str, args: Namespace, run_info: dict[str, Any]) -> str:
    """Write (or update, when called again in the same run) the sidecar of ``csv_path``."""
    path = sidecar_path(csv_path)
    record = build_metadata(args, run_info)
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
