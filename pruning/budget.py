"""Choosing under a budget: remove units until the model is small or fast enough.

--target-params keeps at most a fraction of the original parameters (0.8)
or a count (60M, 1.5B, 500K, 60000000); --target-speedup asks for a measured
prefill speed-up over the unpruned model (1.3 = 30% faster). The choosing
modes then remove units in their rule's order (importance) or search order
(greedy, beam), one more each time, until the target is met, instead of a
fixed --num-remove. Parameters are counted on the pruned model itself (tied
weights once, evaluation.params); the speed-up is timed, with the units
really skipped (models.removal.removed_units).
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from config import SelectSpec
from models.units import Removal
from utils.errors import KitError

if TYPE_CHECKING:
    from pruning.calibration import Calibration

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}
# Timed prefill runs per candidate, after one untimed run: a median of a few is steady enough to stop on.
SPEED_RUNS = 5
PREFILL_TOKENS = 256


def parse_params_target(text: str) -> float:
    """'0.8' -> 0.8 (a fraction of the original), '60M' -> 6e7 (a count); a KitError for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*", text, re.IGNORECASE)
    value = float(match.group(1)) * _SUFFIX[match.group(2).upper()] if match else 0.0
    fraction = bool(match) and not match.group(2) and 0 < value < 1
    count = bool(match) and value >= 1 and (bool(match.group(2)) or value.is_integer())
    if not (fraction or count):
        raise KitError(f"--target-params expects a fraction in (0, 1) such as 0.8 or a count such as 60M, "
                       f"got '{text}'")
    return value


def target_label(select: SelectSpec) -> str | None:
    """The target as the CSV's ``target`` column records it, or None without one."""
    if select.target_params is not None:
        return f"params<={select.target_params}"
    if select.target_speedup is not None:
        return f"prefill speed-up>={select.target_speedup}"
    return None


def _prefill_ms(model, tokens: int) -> float:
    import torch

    device = next(model.parameters()).device
    ids = torch.arange(tokens, device=device).remainder(model.config.vocab_size).view(1, -1)
    times = []
    with torch.no_grad():
        for run in range(SPEED_RUNS + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if run:  # the first run warms up
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


@dataclass
class Budget:
    """Whether a removal set meets the run's target, measured on the calibration model (cached per set)."""

    calib: "Calibration"
    select: SelectSpec
    _seen: dict[Removal, bool] = field(default_factory=dict, repr=False)
    _base: float | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.select.target_params is not None or self.select.target_speedup is not None

    def met(self, removal: Removal) -> bool:
        if removal not in self._seen:
            self._seen[removal] = self._measure(removal)
        return self._seen[removal]

    def _measure(self, removal: Removal) -> bool:
        from evaluation.params import count_parameters
        from models.removal import context_size, removed_units

        model = self.calib.model
        tokens = min(PREFILL_TOKENS, context_size(model))
        if self._base is None:  # the unpruned model's size or prefill time, measured before any removal
            self._base = count_parameters(model) if self.select.target_params is not None else _prefill_ms(model, tokens)
        with removed_units(model, removal) as pruned:
            if self.select.target_params is not None:
                target = parse_params_target(self.select.target_params)
                return count_parameters(pruned) <= (target * self._base if target < 1 else target)
            return self._base / _prefill_ms(pruned, tokens) >= self.select.target_speedup

    def fewest(self, chosen: Callable[[int], Removal], most: int) -> int:
        """The smallest k in 1..most whose ``chosen(k)`` meets the target."""
        for k in range(1, most + 1):
            if self.met(chosen(k)):
                return k
        raise KitError(f"no choice of up to {most} units meets {target_label(self.select)}")
