"""The running state of a perplexity pass, and the checkpoint file that lets an interrupted pass continue.

A pass (evaluation.engine.run_pass) adds up, window batch by window batch,
each configuration's NLL and scored tokens, its KL divergence and top-1
agreement sums, and its NLL per interval block (evaluation.intervals). That
is all of its state: saved at a window-batch boundary, it lets a later run
take the remaining windows and end with the very sums, to the last bit, of a
run that was never stopped (same device and batch size: the batching after a
boundary is the one the first run would have used).

The checkpoint is written at least every SAVE_SECONDS and at every
SAVE_FRACTION of the pass's windows, whichever comes first, as a temporary
file replaced in one step (a crash leaves the old checkpoint or the new one),
and once more when the pass ends, so that its results survive until their
rows are written (the speed tests run after the pass). A checkpoint records
the identity of its pass (configurations, windows, batch size, model, data,
device); one that differs from the run's is refused, naming the field.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import nn

from evaluation.windows import Window
from utils.errors import KitError, WriteError

SAVE_SECONDS = 30.0
SAVE_FRACTION = 0.05
# Values of each parameter tensor that go into the model's fingerprint (hashing all of a large model's weights
# would take longer than many passes).
FINGERPRINT_VALUES = 4096


@dataclass
class PassState:
    """Sums of a pass so far, one entry per configuration; ``done`` of its ``windows`` are in them."""

    identity: dict[str, Any]
    windows: int
    nll: list[float]
    tokens: list[int]
    kl: list[float]
    agree: list[int]
    blocks: torch.Tensor  # configurations x interval blocks: NLL sums, float64
    done: int = 0

    @classmethod
    def fresh(cls, identity: dict[str, Any], windows: int, configurations: int, n_blocks: int) -> "PassState":
        return cls(identity, windows, [0.0] * configurations, [0] * configurations, [0.0] * configurations,
                   [0] * configurations, torch.zeros(configurations, n_blocks, dtype=torch.float64))

    @property
    def complete(self) -> bool:
        return self.done == self.windows


def pass_identity(model: nn.Module, ids: torch.Tensor, windows: Sequence[Window], configurations: Sequence[str],
                  batch_size: int, settings: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for a checkpoint's sums to continue in this run. ``settings``: the pass's own
    (interval blocks, divergence on or off)."""
    first = next(p for p in model.parameters() if p.device.type != "meta")
    digest = hashlib.sha256()
    for p in model.parameters():  # an offloaded weight (--device-map, on "meta" here) counts by its shape
        digest.update(str(tuple(p.shape)).encode() if p.device.type == "meta"
                      else p.detach().flatten()[:FINGERPRINT_VALUES].float().cpu().numpy().tobytes())
    return {
        "configurations": list(configurations),
        "windows": hashlib.sha256(repr([asdict(w) for w in windows]).encode()).hexdigest()[:16],
        "batch_size": batch_size,
        "model": f"{getattr(model.config, 'name_or_path', '') or type(model).__name__}, "
                 f"{sum(p.numel() for p in model.parameters())} parameters, weights {digest.hexdigest()[:16]}",
        "data": f"{len(ids)} tokens, {hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]}",
        "device": first.device.type, "dtype": str(first.dtype).removeprefix("torch."),
        **settings,
    }


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return f"[{', '.join(map(str, value[:6]))}{', ...' if len(value) > 6 else ''}] ({len(value)})"
    return str(value)


@dataclass
class PassCheckpoint:
    """The checkpoint file of the passes of one results file; ``seconds``: time spent writing it."""

    path: str
    seconds: float = 0.0
    saves: int = 0
    _last: float = field(default=0.0, repr=False)
    _mark: int = field(default=0, repr=False)
    _step: int = field(default=1, repr=False)

    def read(self) -> PassState | None:
        if not os.path.exists(self.path):
            return None
        try:
            data = torch.load(self.path, weights_only=True)
            return PassState(**data)
        except Exception as exc:  # a foreign or damaged file: say which, never continue from it
            raise KitError(f"pass checkpoint '{self.path}' cannot be read ({type(exc).__name__}); remove it to "
                           "evaluate its configurations afresh") from None

    def load(self, identity: dict[str, Any]) -> PassState | None:
        """The saved state of the pass ``identity`` names; a checkpoint of another pass is refused by field."""
        state = self.read()
        if state is None:
            return None
        for key, value in identity.items():
            theirs = state.identity.get(key)
            if theirs != value:
                raise KitError(f"pass checkpoint '{self.path}' was made with {key} {_shown(theirs)}, this run has "
                               f"{_shown(value)}; resume with the same settings, or remove it to evaluate its "
                               "configurations afresh")
        return state

    def start(self, state: PassState) -> None:
        """Time and windows are counted from here; the next save is due at the next SAVE_FRACTION mark."""
        self._last = time.perf_counter()
        step = max(1, math.ceil(SAVE_FRACTION * state.windows))
        self._mark = (state.done // step + 1) * step
        self._step = step

    def tick(self, state: PassState) -> None:
        """Save if SAVE_SECONDS have passed or the next SAVE_FRACTION of the windows is done."""
        if state.done >= self._mark or time.perf_counter() - self._last >= SAVE_SECONDS:
            self.save(state)
            self._mark = (state.done // self._step + 1) * self._step

    def save(self, state: PassState) -> None:
        start = time.perf_counter()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save({f.name: getattr(state, f.name) for f in fields(state)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise WriteError(f"cannot write the pass checkpoint '{self.path}': {exc.strerror}; the results file "
                             "beside it is intact") from None
        self._last = time.perf_counter()
        self.seconds += self._last - start
        self.saves += 1

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
