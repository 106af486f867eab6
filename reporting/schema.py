"""The results row: its columns (users' scripts read them by name, so they
only ever grow at the end) and how a measurement becomes a row."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from models.units import removed_whole, unit_names

COLUMNS = [
    "mode", "model", "dataset", "removed_layers", "num_removed", "num_layers", "perplexity", "ppl_change_pct",
    "params", "params_m", "params_change_pct", "latency_ms", "latency_iqr_ms", "prefill_ms", "tokens_per_s",
    "speed_change_pct", "eval_tokens", "device", "dtype", "timestamp",
    # modes that choose blocks on calibration tokens (importance, greedy, beam, compare); empty otherwise
    "metric", "scores",
    # the removal set as units, JSON: ["block2", "attn4", "mlp5"] (removed_layers lists only the whole blocks)
    "removed_units", "kv_cache_bytes_per_token",
    # --target-params / --target-speedup the choosing mode removed units until it met; empty otherwise
    "target",
]
# The columns a file must have for --mode report to draw from it.
REQUIRED_COLUMNS = ("removed_layers", "num_layers", "perplexity")
CHANGE_COLUMNS = ("ppl_change_pct", "params_change_pct", "speed_change_pct")


def change_pct(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0 or math.isnan(reference):
        return None
    if math.isinf(value) or math.isinf(reference):
        return math.inf if value > reference else (0.0 if value == reference else -100.0)
    return (value - reference) / reference * 100.0


def with_changes(row: dict, base: dict | None) -> dict:
    """``row`` with its change columns against the baseline row ``base`` (empty without one)."""
    if base is None:
        return {**dict.fromkeys(CHANGE_COLUMNS), **row}
    return {**row,
            "ppl_change_pct": change_pct(row["perplexity"], base["perplexity"]),
            "params_change_pct": change_pct(row.get("params"), base.get("params")),
            "speed_change_pct": change_pct(row.get("latency_ms"), base.get("latency_ms"))}


def to_row(measurement: Any, context: dict) -> dict:
    """A row from an evaluation.sweep.Measurement and the run's fixed columns (mode, model, ...)."""
    m, lat = measurement, measurement.latency
    return {
        **context,
        "removed_layers": list(removed_whole(m.removed)),
        "num_removed": len(removed_whole(m.removed)),
        "num_layers": m.num_layers,
        "perplexity": m.ppl.perplexity,
        "params": m.params,
        "params_m": m.params / 1e6,
        "latency_ms": lat.latency_ms if lat else None,
        "latency_iqr_ms": lat.latency_iqr_ms if lat else None,
        "prefill_ms": lat.prefill_ms if lat else None,
        "tokens_per_s": lat.tokens_per_s if lat else None,
        "eval_tokens": m.ppl.tokens,
        "timestamp": datetime.now().isoformat(timespec="seconds"),
        "removed_units": unit_names(m.removed),
        "kv_cache_bytes_per_token": m.kv_cache_bytes,
    }
