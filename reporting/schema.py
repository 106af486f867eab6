"""The results row: its columns (users' scripts read them by name, so they
only ever grow at the end) and how a measurement becomes a row.

With --tasks, the fixed COLUMNS are followed by columns per downstream task,
``task:<task>:<metric>``: ``n`` (examples scored), then for acc, acc_norm and
exact_match (``exact_match/<filter>`` where a task filters its answers),
where the task has them, the value (a fraction, as lm-eval reports it), its
standard error and ``<metric>_change_pts``, the change against the baseline
in percentage points. Which tasks and metrics a run has is known once its
tasks are loaded, before the file is created, so every file has one header.
"""

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
    # the speed change's interval, and the median of the baseline runs interleaved with this configuration's
    "speed_change_low_pct", "speed_change_high_pct", "baseline_latency_ms",
    # the perplexity convention (evaluation.windows), "+bos" when every window starts with BOS
    "protocol",
    # the removal set as units, JSON: ["block2", "attn4", "mlp5"] (removed_layers lists only the whole blocks)
    "removed_units", "kv_cache_bytes_per_token",
    # --target-params / --target-speedup the choosing mode removed units until it met; empty otherwise
    "target",
    # --patch: the method whose fitted maps were merged into this row's model (pruning.compensation), or none
    "patch",
    # the perplexity's 95% interval (block bootstrap over scored tokens, evaluation.intervals), the interval of
    # its change against the baseline in percent (paired resampling; empty for the baseline), and the mean
    # KL(original || pruned) and share of scored positions with the original's top-1 token (with --kl)
    "ppl_low", "ppl_high", "ppl_change_low_pct", "ppl_change_high_pct", "kld", "top1_agreement",
]
# The columns of files written before the pass columns: such a file is still resumed (csvfile.check_columns).
EARLIER_COLUMNS = COLUMNS[: COLUMNS.index("ppl_low")]
# The columns a file must have for --mode report to draw from it.
REQUIRED_COLUMNS = ("removed_layers", "num_layers", "perplexity")
CHANGE_COLUMNS = ("ppl_change_pct", "params_change_pct", "speed_change_pct")
TASK_PREFIX = "task:"


def task_column(task: str, metric: str) -> str:
    return f"{TASK_PREFIX}{task}:{metric}"


def task_columns(metrics: dict[str, tuple[str, ...]]) -> list[str]:
    """The task columns, given each task's metrics (evaluation.tasks.TaskScorer.metrics)."""
    return [task_column(task, name) for task, ms in metrics.items()
            for name in ("n", *(f"{m}{suffix}" for m in ms for suffix in ("", "_stderr", "_change_pts")))]


def columns_of(row: dict) -> list[str]:
    """A file's columns from one of its rows: the fixed ones, then its task columns in their order."""
    return COLUMNS + [k for k in row if k.startswith(TASK_PREFIX)]


def task_metrics(row: dict) -> dict[str, list[str]]:
    """Task -> metrics (acc, acc_norm, exact_match) whose values a row's columns hold, in column order."""
    return {task: [m for m in values if m != "n" and not m.endswith("_stderr")]
            for task, values in row_task_scores(row).items()}


def task_cells(scores: dict[str, dict] | None) -> dict:
    """Task scores (evaluation.tasks.TaskScorer's result) as row cells."""
    return {task_column(task, metric): value for task, values in (scores or {}).items()
            for metric, value in values.items()}


def row_task_scores(row: dict) -> dict[str, dict]:
    """A row's task scores back in TaskScorer's form, {task: {"n": ..., "acc": ..., "acc_stderr": ...}}."""
    scores: dict[str, dict] = {}
    for key, value in row.items():
        if key.startswith(TASK_PREFIX) and not key.endswith("_change_pts"):
            task, metric = key[len(TASK_PREFIX):].rsplit(":", 1)
            scores.setdefault(task, {})[metric] = value
    return scores


def _points(value, reference) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)):
        return None
    return (value - reference) * 100.0


def change_pct(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0 or math.isnan(reference):
        return None
    if math.isinf(value) or math.isinf(reference):
        return math.inf if value > reference else (0.0 if value == reference else -100.0)
    return (value - reference) / reference * 100.0


def _contains_zero(row: dict, low: str, high: str) -> bool | None:
    low, high = row.get(low), row.get(high)
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or math.isnan(low) or math.isnan(high):
        return None
    return low <= 0.0 <= high


def ppl_within_noise(row: dict) -> bool | None:
    """Whether the row's perplexity change is within the text's sampling noise (its paired 95% interval
    includes 0); None: no interval (the baseline, older files)."""
    return _contains_zero(row, "ppl_change_low_pct", "ppl_change_high_pct")


def speed_within_noise(row: dict) -> bool | None:
    """Whether the row's speed change is within the timing noise (its interval includes 0); None: no interval."""
    return _contains_zero(row, "speed_change_low_pct", "speed_change_high_pct")


def with_changes(row: dict, base: dict | None) -> dict:
    """``row`` with its change columns against the baseline row ``base`` (empty without one).

    A row timed against interleaved baseline runs (``baseline_latency_ms``)
    keeps its speed change against those: the baseline row's own runs were
    timed at another moment, under another load.
    """
    tasks = task_metrics(row)
    if base is None:
        return {**dict.fromkeys(CHANGE_COLUMNS), **{task_column(t, f"{m}_change_pts"): None
                                                    for t, ms in tasks.items() for m in ms}, **row}
    paired = row.get("baseline_latency_ms")
    return {**row,
            "ppl_change_pct": change_pct(row["perplexity"], base["perplexity"]),
            "params_change_pct": change_pct(row.get("params"), base.get("params")),
            "speed_change_pct": change_pct(row.get("latency_ms"), base.get("latency_ms") if paired is None else paired),
            **{task_column(t, f"{m}_change_pts"): _points(row.get(task_column(t, m)), base.get(task_column(t, m)))
               for t, ms in tasks.items() for m in ms}}


def to_row(measurement: Any, context: dict) -> dict:
    """A row from an evaluation.sweep.Measurement and the run's fixed columns (mode, model, ...)."""
    m, lat, speed = measurement, measurement.latency, measurement.speed
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
        "speed_change_low_pct": speed.low_pct if speed else None,
        "speed_change_high_pct": speed.high_pct if speed else None,
        "baseline_latency_ms": speed.baseline.latency_ms if speed else None,
        "eval_tokens": m.ppl.tokens,
        "timestamp": datetime.now().isoformat(timespec="seconds"),
        "removed_units": unit_names(m.removed),
        "kv_cache_bytes_per_token": m.kv_cache_bytes,
        "ppl_low": m.ppl_interval[0] if m.ppl_interval else None,
        "ppl_high": m.ppl_interval[1] if m.ppl_interval else None,
        "ppl_change_low_pct": m.change_interval[0] if m.change_interval else None,
        "ppl_change_high_pct": m.change_interval[1] if m.change_interval else None,
        "kld": m.kld,
        "top1_agreement": m.top1_agreement,
        **task_cells(m.tasks),
    }
