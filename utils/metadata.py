"""Facts about the machine and the software a run used: library versions, the
kit's commit, the device's name, the time. The results sidecar records them."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from datetime import datetime
from importlib import metadata as importlib_metadata
from typing import Any

KIT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "safetensors", "accelerate", "numpy", "pandas",
             "matplotlib", "tqdm", "peft", "huggingface_hub",
             "lm_eval")


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="microseconds")


@functools.cache
def library_versions() -> dict[str, str | None]:
    """Installed versions (None: not installed); looked up once per process, as the sidecar is saved
    several times a run."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(root: str, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The kit's commit, and whether its tracked files differ from it; None outside a git checkout."""
    return dict(_git_state(KIT_ROOT))


@functools.cache
def _git_state(root: str) -> dict[str, Any]:
    # two git processes: once per process, not at every save of the sidecar
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
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
