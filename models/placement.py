"""One model over several devices: accelerate's big-model placement, and what the kit needs to run on it.

With --device-map, from_pretrained places each block (and the embeddings,
final norm and LM head) on a GPU, in CPU memory or on disk, as --max-memory
allows, and accelerate attaches a hook (AlignDevicesHook) to every placed
module that moves its inputs to its execution device and, for offloaded
modules, brings its weights in for the call and drops them after. The kit's
block calls, removal and generate() all go through the modules' own
__call__, so they work unchanged; two things need help: a weight read
directly (the LM head's, sliced by evaluation.perplexity) is brought in with
``weights_at_hand``, and inputs go to ``input_device`` rather than to the
device of the first parameter, which may be the meta device.

This is for a model too large for one device. Data parallelism (accelerate
launch) runs a whole model per process instead; see docs/real-checkpoint.md.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from utils.errors import KitError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """--device-map, --max-memory and --offload-dir; ``device_map`` None is one device (--device)."""

    device_map: str | None = None
    max_memory: str | None = None  # "0=20GiB,cpu=60GiB"
    offload_dir: str | None = None

    def load_kwargs(self, offload_dir: str | None = None) -> dict:
        """from_pretrained's keywords; ``offload_dir`` overrides --offload-dir (a reload's own folder)."""
        if self.device_map is None:
            return {}
        folder = offload_dir or self.offload_dir
        return {"device_map": self.device_map, "max_memory": parse_max_memory(self.max_memory),
                **({"offload_folder": folder} if folder else {})}


def parse_max_memory(text: str | None) -> dict | None:
    """'0=20GiB,cpu=60GiB' -> {0: '20GiB', 'cpu': '60GiB'} (a GPU index, cpu or disk; sizes as accelerate reads them)."""
    if not text:
        return None
    limits: dict = {}
    for part in text.split(","):
        device, _, size = part.strip().partition("=")
        device = device.strip()
        if not size.strip() or not (device.isdigit() or device in ("cpu", "disk", "mps")):
            raise KitError(f"--max-memory expects DEVICE=SIZE pairs such as 0=20GiB,cpu=60GiB, got '{part.strip()}'")
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size.strip(), flags=re.IGNORECASE):
            raise KitError(f"--max-memory size '{size.strip()}' is not a size such as 20GiB or 500MB")
        limits[int(device) if device.isdigit() else device] = size.strip()
    return limits


def is_dispatched(model: nn.Module) -> bool:
    """True when accelerate spread the model over devices (hooks on its modules)."""
    return bool(getattr(model, "hf_device_map", None)) and any(hasattr(m, "_hf_hook") for m in model.modules())


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its hook's execution device, or the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """The device token ids are fed on: the input embeddings' execution device."""
    get = getattr(model, "get_input_embeddings", None)
    return execution_device(get() if get is not None else model)


@contextlib.contextmanager
def weights_at_hand(module: nn.Module) -> Iterator[torch.device]:
    """Within the block, ``module``'s own weights are real tensors on its execution device (yielded)."""
    if getattr(module, "_hf_hook", None) is None:
        yield execution_device(module)
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield execution_device(module)
