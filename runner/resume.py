"""--resume: continue a results file only with rows that compare with its own.

The sidecar of every results file records the run's identity: everything
that makes two rows comparable (what is evaluated, on which tokens, with which
windows, dtype, device, seed, timing and selection settings). A local model
and a local dataset are known by their contents (models by a hash of their
config, tokenizer and weight files), not by the path they were given as: the
same model by a relative path continues a file, another model copied to the
same path does not. A resumed run must have
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
from models.loading import looks_local
from runner.modes import MODES
from runner.options import BY_FIELD, OPTIONS
from reporting.csvfile import check_columns, check_unique, drop_partial_row, read_rows
from reporting.sidecar import read_sidecar
from utils.cache import default_cache_dir, file_hash, model_fingerprint
from utils.data import is_local_dataset
from utils.errors import KitError

log = logging.getLogger("gpt2-pruning-kit")


def run_identity(config: RunConfig, windows: WindowSpec, device: str, dtype: str,
                 revision: str | None = None) -> dict[str, Any]:
    """What must be equal for rows of two runs to sit in one file. ``windows`` are the resolved ones;
    ``revision`` is a Hub model's commit (None for a local one, which is known by its files' contents)."""
    data, shard = config.data, config.output.shard
    local = is_local_dataset(data.dataset) and os.path.isfile(data.dataset)
    cache_dir = None if data.no_cache else (data.cache_dir or str(default_cache_dir()))
    model_path = os.path.expanduser(data.model)
    identity = {
        "mode": config.mode, "model": data.model,
        "model_sha256": (model_fingerprint(model_path, cache_dir) if looks_local(data.model) and
                         os.path.exists(model_path) else f"{data.model}@{revision or 'unknown revision'}"),
        "dataset": data.dataset, "dataset_sha256": file_hash(data.dataset) if local else None,
        "split": data.split, "text_column": data.text_column, "max_tokens": data.max_tokens,
        # the convention first: another --protocol also changes the stride, and the protocol is what differs
        # (the batch size changes the last bits of a sum at most: not part of the identity)
        **{f"window_{k}": getattr(windows, k) for k in ("protocol", "bos", "max_length", "stride", "prefix_token")},
        "dtype": dtype, "device": device, "speed": _speed(asdict(config.speed)),
        "shard": str(shard) if shard else None,
        **selection(config),
    }
    if MODES[config.mode].seeded:
        identity["seed"] = config.seed
    identity["patch"] = config.select.patch  # a patched row is another model than the plain one
    if config.select.patch != "none":  # its maps are fitted on the calibration tokens
        identity["calib_tokens"] = config.select.calib_tokens
    return identity


def selection(config: RunConfig) -> dict[str, Any]:
    """The selection options the mode reads, which decide the configurations it evaluates (--max-configs only
    caps a plan, so it is not among them)."""
    chosen = {}
    for option in OPTIONS:
        spec, _, name = option.to.partition(".")
        if spec == "select" and option.reads(config.mode) and name != "max_configs":
            value = getattr(config.select, name)
            chosen[f"select_{name}"] = [str(u) for u in value] if isinstance(value, tuple) else value
    return chosen


def _speed(speed: dict) -> dict:
    """The speed settings that shape the rows: none of them when nothing is timed (--no-speed)."""
    return speed if speed.get("enabled", True) else {"enabled": False}


# Identity keys shown by their option; the rest by their field of RunConfig (runner.options.BY_FIELD).
LABELS = {"mode": "--mode", "window_prefix_token": "the windows' prefix token id", "device": "device",
          "dtype": "dtype", "speed.enabled": "the speed test"}
FIELDS = {"model": "data.model", "dataset": "data.dataset", "split": "data.split", "text_column": "data.text_column",
          "max_tokens": "data.max_tokens", "shard": "output.shard", "seed": "seed", "protocol": "windows.protocol"}
# A path is only a name: where its content is known, the content is compared instead.
CONTENT = {"model": "model_sha256", "dataset": "dataset_sha256"}


def label(key: str) -> str:
    """An identity key as the user knows it: its command-line option where it has one."""
    if key in LABELS:
        return LABELS[key]
    field = FIELDS.get(key) or key.replace("window_", "windows.", 1).replace("select_", "select.", 1)
    option = BY_FIELD.get(field)
    return option.flag if option else key.replace("_", " ")


def shown(value: Any) -> str:
    """A recorded value as the command line would give it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, str) and (not value or value != value.strip() or " " in value):
        return repr(value)
    return str(value)


def differences(recorded: dict[str, Any], identity: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, this run's value) of every identity field that differs, in identity order;
    the speed settings field by field."""
    found = []
    for key, value in identity.items():
        if key not in recorded or (key in CONTENT and recorded.get(CONTENT[key]) and identity.get(CONTENT[key])):
            continue
        old = recorded[key]
        if key == "speed" and isinstance(old, dict):
            old, on = _speed(old), value.get("enabled", True)
            if old.get("enabled", True) != on:
                found.append(("speed.enabled", old.get("enabled", True), on))
            found += [(f"speed.{k}", old.get(k), v) for k, v in value.items() if k != "enabled" and old.get(k) != v]
        elif old != value:
            found.append((key, old, value))
    return found


def refusal(path: str, key: str, old: Any, new: Any, model: str) -> str:
    """The one line that says why ``path`` cannot be continued."""
    if key == "model_sha256":
        what = f"another model than --model '{model}' now is (its config, tokenizer or weight files differ)"
    elif key == "dataset_sha256":
        what = "other --dataset text (the file's contents differ)"
    else:
        what = f"{label(key)} {shown(old)}, this run has {shown(new)}"
    return f"--resume file '{path}' was made with {what}; its rows would not compare with this run's (start a new file)"


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
    found = differences(recorded, identity)
    if found:
        raise KitError(refusal(path, *found[0], identity.get("model")))
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
