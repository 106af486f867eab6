"""Sweeps spread over several workers.

Two ways to split a sweep, which combine:

- ``accelerate launch --num_processes N main.py ...`` (or torchrun, or an MPI
  launcher accelerate understands): every process loads the model, evaluates
  its share of the configurations and sends each row to the main process,
  which writes the one results file as rows arrive.
- ``--shard I/N`` for schedulers that start independent jobs (Slurm arrays):
  job I evaluates its share and writes its own file; ``--mode merge``
  (runner.merge) joins the files.

Shares are taken round-robin from the planned order. Neighbouring
configurations of a sweep remove about as many blocks and so cost about the
same, which keeps the shares balanced, and the processes, which exchange
rows after every configuration, seldom wait for each other.

accelerate is imported only when a launcher started several processes, so a
plain ``python main.py`` pays nothing for it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from utils.errors import KitError

T = TypeVar("T")

log = logging.getLogger("gpt2-pruning-kit")

# Environment variables through which launchers announce the number of
# processes (torchrun/accelerate, then the MPI flavours accelerate supports).
WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
# How long a process may wait for the others at a collective call. A process
# that finished its share waits while the slowest one finishes a whole
# configuration, which for a large model on the full test split takes far
# longer than torch's 10-30 minute default. A crashed peer is caught by the
# launcher, which stops all processes, not by this timeout.
COLLECTIVE_TIMEOUT = timedelta(hours=24)


# ---- splitting -------------------------------------------------------------------------------

def share(items: Sequence[T], index: int, count: int) -> list[T]:
    """Worker ``index`` of ``count``: every count-th item, starting at its own index."""
    return list(items[index::count])


# ---- processes -------------------------------------------------------------------------------

def launched_processes() -> int:
    """How many processes a launcher started (1 under plain python)."""
    for name in WORLD_SIZE_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


@dataclass
class Processes:
    """This process's place among the processes of a run, and how they talk.

    A single process is its own main process and every exchange returns its
    own data, so the run reads the same either way.
    """

    index: int = 0
    count: int = 1
    device: Any = None  # the device accelerate assigned to this process; None: choose as usual
    _gather: Callable[[list], list] | None = None
    _broadcast: Callable[[list], list] | None = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def gather(self, item: Any) -> list:
        """Every process's ``item``, in process order, on every process."""
        return self._gather([item]) if self._gather else [item]

    def from_main(self, compute: Callable[[], T]) -> T:
        """Run ``compute`` on the main process only and hand its result to all.

        Used for what reads or checks the main process's files (a --resume
        file, the output folder): on several nodes only the main process may
        see them. A KitError there is raised on every process, so none waits
        forever for the others.
        """
        if self._broadcast is None:
            return compute()
        outcome: list = [None]
        if self.is_main:
            try:
                outcome = [("ok", compute())]
            except KitError as exc:
                outcome = [("error", str(exc))]
        kind, value = self._broadcast(outcome)[0]
        if kind == "error":
            raise KitError(value)
        return value


def current_processes(device: str) -> Processes:
    """The processes of this run; starts accelerate's process group when launched with several."""
    if launched_processes() <= 1:
        return Processes()
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    use_cpu = (device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
               or not torch.cuda.is_available())
    state = PartialState(cpu=use_cpu, timeout=COLLECTIVE_TIMEOUT)
    if state.num_processes <= 1:
        return Processes()
    log.info(f"process {state.process_index} of {state.num_processes} ({state.backend}, {state.device})")
    return Processes(state.process_index, state.num_processes, state.device, gather_object,
                     broadcast_object_list)


def in_rounds(processes: Processes, items: Iterable[T]) -> Iterator[list[T]]:
    """The items all processes produce, round by round, on every process.

    In each round every process contributes its next item (or None once it
    has none left), so the main process can write rows as they arrive instead
    of at the end. Ends when no process has anything left.
    """
    source = iter(items)
    while True:
        batch = [item for item in processes.gather(next(source, None)) if item is not None]
        if not batch:
            return
        yield batch
