"""--resume: continue a results file only with rows that compare with its own.

The sidecar of every results file records the run's identity: everything
that makes two rows comparable (what is evaluated, on which tokens, with which
windows, dtype, device, seed and timing settings). A resumed run must have
the same identity, field by field; and the file's baseline row must be the one
its run recorded, so an edited file cannot shift every change column.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any

from config import RunConfig, WindowSpec
from models.units import row_removal
from runner.modes import MODES
from reporting.csvfile import check_columns, check_unique, drop_partial_row, read_rows
from reporting.sidecar import read_sidecar
from utils.cache import file_hash
from utils.data import is_local_dataset
from utils.errors import KitError

log = logging.getLogger("gpt2-pruning-kit")


def run_identity(config: RunConfig, windows: WindowSpec, device: str, dtype: str) -> dict[str, Any]:
    """What must be equal for rows of two runs to sit in one file. ``windows`` are the resolved ones."""
    data, shard = config.data, config.output.shard
    local = is_local_dataset(data.dataset) and os.path.isfile(data.dataset)
    identity = {
        "mode": config.mode, "model": data.model, "dataset": data.dataset,
        "dataset_sha256": file_hash(data.dataset) if local else None,
        "split": data.split, "text_column": data.text_column, "max_tokens": data.max_tokens,
        # the batch size changes the last bits of a sum at most: not part of the identity
        **{f"window_{k}": v for k, v in asdict(windows).items() if k != "batch_size"},
        "dtype": dtype, "device": device, "speed": asdict(config.speed),
        "shard": str(shard) if shard else None,
    }
    if MODES[config.mode].seeded:
        identity["seed"] = config.seed
    identity["patch"] = config.select.patch  # a patched row is another model than the plain one
    if config.select.patch != "none":  # its maps are fitted on the calibration tokens
        identity["calib_tokens"] = config.select.calib_tokens
    return identity


def resumed_rows(path: str) -> list[dict]:
    """The rows of a --resume file, a half-written last row cut off first (that configuration runs again)."""
    if not os.path.isfile(path):
        raise KitError(f"results file '{path}' does not exist")
    check_columns(path)
    if drop_partial_row(path):
        log.warning(f"'{path}' ended in a half-written row (a crash while writing it); it was dropped and its "
                    "configuration is evaluated again")
    rows = read_rows(path)
    check_unique(rows, path)
    return rows


def check_same_experiment(path: str, rows: list[dict], identity: dict[str, Any], scored_tokens: int,
                          protocol: str) -> dict | None:
    """Refuse to continue ``path`` unless its run had this run's identity and its baseline is untouched;
    the baseline its run recorded (None when none was). ``protocol`` is this run's window label."""
    record = read_sidecar(path) or {}
    recorded = record.get("identity")
    unrecorded = recorded is None
    if unrecorded:  # an older file: what its rows say (files from before --protocol were all sliding windows)
        recorded = {key: rows[0].get(key) for key in ("mode", "model", "dataset", "dtype", "device")} if rows else {}
        identity = {**identity, "protocol": protocol}
        if rows:
            recorded["protocol"] = rows[0].get("protocol") or "sliding"
    for key, value in identity.items():
        if key in recorded and recorded[key] != value:
            raise KitError(f"--resume file '{path}' was made with {key} {recorded[key]}, this run has {value}; "
                           "its rows would not compare with this run's (start a new file)")
    other = next((r.get("eval_tokens") for r in rows if r.get("eval_tokens") != scored_tokens), None)
    if other is not None:
        raise KitError(f"--resume file '{path}' was evaluated on {other} tokens, this run scores {scored_tokens}: "
                       "use the same --dataset, --max-tokens, --max-length and --stride")
    baseline = record.get("baseline")
    row = next((r for r in rows if not row_removal(r)), None)
    if baseline and row and (row["perplexity"] != baseline["perplexity"] or row.get("params") != baseline["params"]):
        raise KitError(f"the baseline row of '{path}' (perplexity {row['perplexity']!r}) differs from the one its "
                       f"run recorded ({baseline['perplexity']!r}): the file was changed after it was written")
    if unrecorded:
        log.warning(f"'{path}' has no run record beside it; only its rows' model, dataset, mode, dtype, device "
                    "and token count were compared with this run's")
    return baseline
