"""Console tables and key observations, in the shape the seed README made familiar."""

from __future__ import annotations

from typing import Sequence

from models.units import is_whole_blocks, row_removal
from reporting.schema import change_pct
from utils.text import compact_label, format_number, format_table, removed_label

# The final table must fit a standard terminal without wrapping.
CONSOLE_WIDTH = 80
# Widest number cell in the console table: larger values lose decimals, then go scientific.
CONSOLE_NUMBER_WIDTH = 10


def units_phrase(removal) -> str:
    """'block 3', 'blocks 1, 3', 'units 1, attn3'."""
    noun = "block" if is_whole_blocks(removal) else "unit"
    return f"{noun}{'' if len(removal) == 1 else 's'} {removed_label(removal)}"


def sweep_cells(rows: Sequence[dict], width: int | None = None) -> list[list[str]]:
    """One row of cells per configuration, shared by the console table and report.md.

    ``width`` caps each number cell (console); None keeps every decimal (report).
    """
    label = removed_label if width is None else compact_label
    return [[
        label(row_removal(r)), str(r["num_layers"]), format_number(r["perplexity"], width=width),
        format_number(r.get("latency_ms"), width=width), format_number(r.get("params_m"), width=width),
        format_number(r.get("ppl_change_pct"), sign=True, width=width), format_number(r.get("speed_change_pct"), sign=True, width=width),
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
    return format_table(headers, cells)


def comparison_cells(original: dict, pruned: dict) -> list[list[str]]:
    """Original against one pruned model, metric by metric (the seed's 'Random Layer Removal')."""
    metrics = [("Perplexity", "perplexity"), ("Inference Speed (ms)", "latency_ms"),
               ("Parameters (M)", "params_m"), ("Layers", "num_layers")]
    body = []
    for label, key in metrics:
        a, b = original.get(key), pruned.get(key)
        digits = 0 if key == "num_layers" else 2
        body.append([label, format_number(a, digits), format_number(b, digits), format_number(change_pct(b, a), sign=True)])
    return body


COMPARISON_HEADERS = ["Metric", "Original Model", "Pruned Model", "Change (%)"]


def comparison_table(original: dict, pruned: dict) -> str:
    return format_table(COMPARISON_HEADERS, comparison_cells(original, pruned))


def observations(rows: Sequence[dict]) -> list[str]:
    """A few sentences a reader would otherwise work out from the table."""
    pruned = [r for r in rows if row_removal(r)]
    if not pruned:
        return []
    label = lambda r: units_phrase(row_removal(r))
    worst = max(pruned, key=lambda r: r["perplexity"])
    best = min(pruned, key=lambda r: r["perplexity"])
    notes = []
    if len(pruned) > 1:
        notes.append(f"Most harmful: removing {label(worst)} (PPL {format_number(worst['perplexity'])}, "
                     f"{format_number(worst['ppl_change_pct'], sign=True)}%)")
    notes.append(f"Least harmful: removing {label(best)} (PPL {format_number(best['perplexity'])}, "
                 f"{format_number(best['ppl_change_pct'], sign=True)}%)")
    timed = [r for r in pruned if r.get("latency_ms") is not None]
    if timed:
        fast = min(timed, key=lambda r: r["latency_ms"])
        notes.append(f"Fastest: removing {label(fast)} ({format_number(fast['latency_ms'])} ms, "
                     f"{format_number(fast['speed_change_pct'], sign=True)}%)")
    return notes
