"""Console tables and key observations, in the shape the seed README made familiar."""

from __future__ import annotations

import math
from typing import Sequence

from models.units import compact_label, is_whole_blocks, removed_label, row_removal
from reporting.schema import change_pct, ppl_within_noise, speed_within_noise, task_column, task_metrics
from utils.text import format_number, format_table

# The final table must fit a standard terminal without wrapping.
CONSOLE_WIDTH = 80
# Widest number cell in the console table: larger values lose decimals, then go scientific.
CONSOLE_NUMBER_WIDTH = 10
# Marks a speed change whose interval includes 0: the timings cannot tell it from no change.
NOISE_MARK = "~"
NOISE_NOTE = f"{NOISE_MARK} speed change within the timing noise (its 95% interval includes 0)"
PPL_NOISE_NOTE = f"{NOISE_MARK} PPL change within the sampling noise (its paired 95% interval includes 0)"


def speed_change_cell(row: dict, width: int | None = None) -> str:
    cell = format_number(row.get("speed_change_pct"), sign=True, width=width)
    return NOISE_MARK + cell if speed_within_noise(row) else cell


def ppl_change_cell(row: dict, width: int | None = None) -> str:
    cell = format_number(row.get("ppl_change_pct"), sign=True, width=width)
    return NOISE_MARK + cell if ppl_within_noise(row) else cell


# Why a speed change need not equal the ratio of the latency column's numbers.
PAIRED_NOTE = "Speed chg %: against baseline runs timed alternately with each configuration's"


def noise_note(rows: Sequence[dict]) -> list[str]:
    """The legends of the change columns: NOISE_MARK in the PPL change, and the speed change's pairing,
    when any change was paired, and NOISE_MARK."""
    paired = any(speed_within_noise(r) is not None for r in rows)
    return ([PPL_NOISE_NOTE] * any(ppl_within_noise(r) for r in rows) + [PAIRED_NOTE] * paired
            + [NOISE_NOTE] * any(speed_within_noise(r) for r in rows))


def units_phrase(removal) -> str:
    """'block 3', 'blocks 1, 3', 'units 1, attn3'."""
    noun = "block" if is_whole_blocks(removal) else "unit"
    return f"{noun}{'' if len(removal) == 1 else 's'} {removed_label(removal)}"


def sweep_cells(rows: Sequence[dict], width: int | None = None) -> list[list[str]]:
    """One row of cells per configuration, shared by the console table and report.md.

    ``width`` caps each number cell (console); None keeps every decimal (report).
    """
    label = removed_label if width is None else compact_label
    patched = lambda r: "" if r.get("patch") in (None, "", "none") else f" +{r['patch']}"  # --patch
    return [[
        label(row_removal(r)) + patched(r), str(r["num_layers"]), format_number(r["perplexity"], width=width),
        format_number(r.get("latency_ms"), width=width), format_number(r.get("params_m"), width=width),
        ppl_change_cell(r, width), speed_change_cell(r, width),
    ] for r in rows]


def sweep_table(rows: Sequence[dict], width: int = CONSOLE_WIDTH) -> str:
    """The seed's sweep table in at most ``width`` columns.

    Number cells are capped at CONSOLE_NUMBER_WIDTH; the removed-blocks column
    takes the room left and cuts longer labels with '..' (the CSV has them whole).
    """
    headers = ["Removed", "Layers", "PPL", "Speed (ms)", "Params (M)", "PPL chg %", "Speed chg %"]
    cells = sweep_cells(rows, width=CONSOLE_NUMBER_WIDTH)
    others = sum(max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers) if i)
    room = max(len(headers[0]), width - others - 2 * (len(headers) - 1))
    for c in cells:
        if len(c[0]) > room:
            c[0] = c[0][: room - 2] + ".."
    return "\n".join([format_table(headers, cells), *noise_note(rows)])


def accuracy_headers(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(task, metric) of every downstream-task score the rows hold, in column order."""
    return [(t, m) for t, ms in task_metrics(rows[0]).items() for m in ms] if rows else []


def accuracy_cell(row: dict, task: str, metric: str, digits: int = 1, stderr: bool = False) -> str:
    """A score in percent, optionally with its standard error, and its change in points for a pruned row."""
    value = row.get(task_column(task, metric))
    if not isinstance(value, (int, float)):
        return "-"
    text = f"{value * 100:.{digits}f}"
    err = row.get(task_column(task, f"{metric}_stderr"))
    if stderr and isinstance(err, (int, float)):
        text += f" ± {err * 100:.{digits}f}"
    change = row.get(task_column(task, f"{metric}_change_pts"))
    if row_removal(row) and isinstance(change, (int, float)):
        text += f" ({change:+.{digits}f})"
    return text


def task_table(rows: Sequence[dict], width: int = CONSOLE_WIDTH) -> str:
    """Each configuration's downstream-task scores (percent, change against the baseline in points), in
    as many tables as ``width`` columns need; empty without task columns."""
    columns = accuracy_headers(rows)
    labels = [compact_label(row_removal(r)) for r in rows]
    tables, start = [], 0
    while start < len(columns):
        used, end = max(len("Removed"), *map(len, labels)), start
        while end < len(columns):
            t, m = columns[end]
            cell = max([len(f"{t} {m}"), *(len(accuracy_cell(r, t, m)) for r in rows)])
            if end > start and used + 2 + cell > width:
                break
            used, end = used + 2 + cell, end + 1
        tables.append(format_table(["Removed", *(f"{t} {m}" for t, m in columns[start:end])],
                                   [[label, *(accuracy_cell(r, t, m) for t, m in columns[start:end])]
                                    for label, r in zip(labels, rows)]))
        start = end
    return "\n\n".join(tables)


def comparison_cells(original: dict, pruned: dict) -> list[list[str]]:
    """Original against one pruned model, metric by metric (the seed's 'Random Layer Removal').

    A speed change with an interval is the pruned row's own, against the baseline runs interleaved with
    its runs; files without one (older kits) get the change between the two rows, as they always did.
    """
    metrics = [("Perplexity", "perplexity"), ("Inference Speed (ms)", "latency_ms"),
               ("Parameters (M)", "params_m"), ("Layers", "num_layers")]
    body = []
    for label, key in metrics:
        a, b = original.get(key), pruned.get(key)
        digits = 0 if key == "num_layers" else 2
        paired = key == "latency_ms" and speed_within_noise(pruned) is not None
        change = speed_change_cell(pruned) if paired else format_number(change_pct(b, a), sign=True)
        if key == "perplexity" and ppl_within_noise(pruned) is not None:
            change = ppl_change_cell(pruned)
        body.append([label, format_number(a, digits), format_number(b, digits), change])
    return body


COMPARISON_HEADERS = ["Metric", "Original Model", "Pruned Model", "Change (%)"]


def comparison_table(original: dict, pruned: dict) -> str:
    return "\n".join([format_table(COMPARISON_HEADERS, comparison_cells(original, pruned)), *noise_note([pruned])])


def observations(rows: Sequence[dict]) -> list[str]:
    """A few sentences a reader would otherwise work out from the table. Rows are ranked only against rows
    removing as many units (a greedy run's steps are not each other's rivals), at the largest such size."""
    pruned = [r for r in rows if row_removal(r)]
    ranked = [r for r in pruned if isinstance(r["perplexity"], (int, float)) and not math.isnan(r["perplexity"])]
    if not ranked:  # a nan perplexity is neither more nor less harmful than another
        return []
    label = lambda r: units_phrase(row_removal(r))
    size = lambda r: len(row_removal(r))
    mixed = len({size(r) for r in ranked}) > 1
    ranked = [r for r in ranked if size(r) == max(map(size, ranked))]
    at = f" of the sets of {size(ranked[0])} units" if mixed else ""
    worst = max(ranked, key=lambda r: r["perplexity"])
    best = min(ranked, key=lambda r: r["perplexity"])
    notes = []
    if len(ranked) > 1:
        word = "Most harmful" if (worst.get("ppl_change_pct") or 0) > 0 else "Highest perplexity (every one lowered it)"
        notes.append(f"{word}{at}: removing {label(worst)} (PPL {format_number(worst['perplexity'])}, "
                     f"{format_number(worst['ppl_change_pct'], sign=True)}%)")
    word = ("Least harmful" if len(ranked) > 1 or (best.get("ppl_change_pct") or 0) > 0
            else "Below the baseline's perplexity")
    notes.append(f"{word}{at}: removing {label(best)} (PPL {format_number(best['perplexity'])}, "
                 f"{ppl_change_cell(best)}%{_ppl_noise_note(best)})")
    fastest = _fastest([r for r in pruned if r.get("latency_ms") is not None])
    if fastest:
        notes.append(f"Fastest: {fastest if isinstance(fastest, str) else _fast_note(fastest, label(fastest))}")
    return notes


def _fastest(timed: Sequence[dict]) -> dict | str | None:
    """The row with the largest speed-up beyond the timing noise, or why there is none.

    Rows timed against interleaved baseline runs are ranked by that change;
    files without intervals (older kits) by latency, as they always were.
    """
    if not timed:
        return None
    if all(speed_within_noise(r) is None for r in timed):
        return min(timed, key=lambda r: r["latency_ms"])
    faster = [r for r in timed if speed_within_noise(r) is False and r["speed_change_pct"] < 0]
    if not faster:
        return "none measurably faster than the baseline (no speed-up beyond the timing noise)"
    return min(faster, key=lambda r: r["speed_change_pct"])


def _ppl_noise_note(best: dict) -> str:
    """Marks a least harmful row whose change is within the sampling noise (the tables' NOISE_MARK)."""
    return ", within the noise" if ppl_within_noise(best) else ""


def ppl_interval_cell(row: dict) -> str:
    """The PPL change's paired 95% interval, e.g. '-0.20% to +0.35%'; '-' where there is none."""
    if ppl_within_noise(row) is None:
        return "-"
    return (f"{format_number(row['ppl_change_low_pct'], sign=True)}% to "
            f"{format_number(row['ppl_change_high_pct'], sign=True)}%")


def interval_cell(row: dict) -> str:
    """The speed change's 95% interval, e.g. '-16.10% to -12.00%'; '-' where none was measured."""
    if speed_within_noise(row) is None:
        return "-"
    if math.isinf(row["speed_change_low_pct"]) or math.isinf(row["speed_change_high_pct"]):
        return "none (too few runs)"
    return (f"{format_number(row['speed_change_low_pct'], sign=True)}% to "
            f"{format_number(row['speed_change_high_pct'], sign=True)}%")


def _fast_note(row: dict, name: str) -> str:
    change = format_number(row["speed_change_pct"], sign=True)
    if speed_within_noise(row) is None:
        return f"removing {name} ({format_number(row['latency_ms'])} ms, {change}%)"
    # its latency was timed at another moment than the other rows': only the paired change compares
    return (f"removing {name} ({change}% against the baseline runs interleaved with its own, "
            f"95% interval {interval_cell(row)})")
