"""report.md: the seed README's tables and key observations, generated from a
results CSV and ready to paste into a README."""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, Sequence

from models.units import is_whole_blocks, removed_label, row_removal, sublayers_in
from reporting.figures import build_figures, figure_path, save_figure
from reporting.schema import REQUIRED_COLUMNS, ppl_within_noise, speed_within_noise, task_column
from reporting.tables import (COMPARISON_HEADERS, accuracy_cell, accuracy_headers, comparison_cells, interval_cell,
                              noise_note, observations, ppl_interval_cell, sweep_cells)
from utils.errors import KitError, WriteError
from utils.files import replace_text
from utils.text import format_number

log = logging.getLogger("gpt2-pruning-kit")

# The seed README's column names; the console table shortens them to fit 80 columns.
SWEEP_HEADERS = ["Layers Removed", "Layers", "Perplexity (↓)", "Speed (ms) ↓", "Parameters (M)", "PPL Change (%)",
                 "Speed Change (%)"]
# Beside the speed change, where the file has intervals (runs interleaved with the baseline's).
SPEED_INTERVAL_HEADER = "Speed Change 95% Interval"
# Beside them, where the file has them (evaluation.intervals, evaluation.divergence).
PPL_INTERVAL_HEADER = "PPL Change 95% Interval"
DIVERGENCE_HEADERS = ["KL (nats)", "Top-1 Agreement (%)"]


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]], left: int = 1) -> str:
    """A GitHub table: the first ``left`` columns (labels) left-aligned, the numbers right-aligned."""
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) if i < left else c.rjust(w)
                                         for i, (c, w) in enumerate(zip(row, widths))) + " |"
    rule = "|" + "|".join(("-" * (w + 2)) if i < left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(c) for c in cells)])


def removal_depth(rows: Sequence[dict]) -> tuple[Callable[[Sequence], int], str]:
    """How the rows' removal sets are counted, and in what: blocks, or sublayers (a block counting two)
    when any row removes a sublayer alone."""
    if all(is_whole_blocks(row_removal(r)) for r in rows):
        return len, "blocks"
    return sublayers_in, "sublayers"


def best_per_depth(rows: Sequence[dict]) -> list[dict]:
    """The lowest-perplexity configuration for each number of removed blocks (or sublayers: removal_depth)."""
    depth, _ = removal_depth(rows)
    best: dict[int, dict] = {}
    for r in rows:
        k = depth(row_removal(r))
        if isinstance(r["perplexity"], float) and math.isnan(r["perplexity"]):  # neither better nor worse
            continue
        if k and (k not in best or r["perplexity"] < best[k]["perplexity"]):
            best[k] = r
    return [best[k] for k in sorted(best)]


def report_markdown(rows: Sequence[dict], figures: Sequence[str] = (), source: str | None = None,
                    mode_report: str | None = None, partial: bool = False, first_header: str | None = None) -> str:
    """The report for one results file; figure paths are linked relative to the report.

    ``first_header`` names the sweep table's first column where the mode has its own (runner.modes);
    ``mode_report`` is the text a choosing mode printed after its runs (compare's gaps to the optimum,
    a search's steps), kept here so that --quiet and batch jobs have it too.
    """
    first = rows[0]
    mode = str(first.get("mode") or "results")
    base = next((r for r in rows if not row_removal(r)), None)
    pruned = [r for r in rows if row_removal(r)]
    lines = [f"# Pruning results: {first.get('model', '?')} ({mode})", ""]
    facts = [f"dataset {first.get('dataset', '?')}"]
    if first.get("eval_tokens") is not None:
        facts.append(f"{first['eval_tokens']:,} tokens scored per configuration")
    if first.get("device"):
        facts.append(f"{first['device']}, {first.get('dtype', '?')}")
    facts.append(f"{len(rows)} configuration{'' if len(rows) == 1 else 's'}" + (" (baseline included)" if base else ""))
    if source:
        facts.append(f"from `{os.path.basename(source)}`")
    summary = "; ".join(facts)
    lines += [summary[0].upper() + summary[1:] + ".", ""]

    notes = noise_note(rows)
    if base and len(pruned) == 1:
        title = f"{mode.capitalize()} Layer Removal"
        lines += [f"## {title}", "", f"Removed {'blocks' if is_whole_blocks(row_removal(pruned[0])) else 'units'}: "
                  f"{removed_label(row_removal(pruned[0]))}.", "",
                  markdown_table(COMPARISON_HEADERS, comparison_cells(base, pruned[0])), ""]
        if ppl_within_noise(pruned[0]) is not None:
            lines += [f"PPL change 95% interval (paired): {ppl_interval_cell(pruned[0])}"
                      + (f"; KL {format_number(pruned[0]['kld'], 4)} nats, top-1 agreement "
                         f"{format_number(pruned[0]['top1_agreement'] * 100)}%" if pruned[0].get("kld") is not None
                         else "") + ".", ""]
        if speed_within_noise(pruned[0]) is not None:
            lines += [f"Speed change 95% interval: {interval_cell(pruned[0])}.", ""]
        if notes:
            lines += [*notes, ""]
    if len(pruned) > 1 or not pruned:
        title = f"{mode.capitalize()} Layer Pruning" if pruned else "Baseline"
        headers = [first_header, *SWEEP_HEADERS[1:]] if first_header else SWEEP_HEADERS
        cells = sweep_cells(rows)
        if any(speed_within_noise(r) is not None for r in rows):
            headers, cells = [*headers, SPEED_INTERVAL_HEADER], [[*c, interval_cell(r)] for c, r in zip(cells, rows)]
        headers, cells = quality_columns(rows, headers, cells)
        lines += [f"## {title}", "", markdown_table(headers, cells), "", *(notes and [*notes, ""])]
    depths = best_per_depth(pruned)
    if len(depths) > 1:
        depth, what = removal_depth(pruned)
        lines += [f"## Best configuration per number of removed {what}" + (" (a block counts two)" * (depth != len)),
                  "", markdown_table([f"{what.capitalize()} Removed", "Best Set", "Perplexity (↓)", "PPL Change (%)"],
                                     [[str(depth(row_removal(r))), removed_label(row_removal(r)),
                                       format_number(r["perplexity"]),
                                       format_number(r.get("ppl_change_pct"), sign=True)]
                                      for r in depths], left=2), ""]
    lines += task_section(rows)
    notes = observations(rows) if len(pruned) > 1 else []
    if notes:
        lines += ["## Key Observations", "", *(f"- {n}" for n in notes), ""]
    if partial:
        lines[1:1] = ["", "**Partial results**: some shards of this sweep were not merged (`--allow-partial`)."]
    if mode_report:
        lines += [f"## {mode.capitalize()} report", "", "```text", mode_report.strip("\n"), "```", ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})" for p in figures] + [""]
    return "\n".join(lines)


def quality_columns(rows: Sequence[dict], headers: list[str], cells: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """The sweep table with the PPL change's interval, KL and top-1 agreement, where the file has them."""
    if any(ppl_within_noise(r) is not None for r in rows):
        headers, cells = [*headers, PPL_INTERVAL_HEADER], [[*c, ppl_interval_cell(r)] for c, r in zip(cells, rows)]
    if any(r.get("kld") is not None for r in rows):
        headers = [*headers, *DIVERGENCE_HEADERS]
        cells = [[*c, format_number(r.get("kld"), 4), format_number(
            r["top1_agreement"] * 100 if r.get("top1_agreement") is not None else None)] for c, r in zip(cells, rows)]
    return headers, cells


def task_section(rows: Sequence[dict]) -> list[str]:
    """Downstream-task scores per configuration (lines of report.md); none without task columns."""
    columns = accuracy_headers(rows)
    if not columns:
        return []
    counts = ", ".join(f"{t} {rows[0].get(task_column(t, 'n'))}" for t in dict.fromkeys(t for t, _ in columns))
    return ["## Downstream tasks", "",
            f"lm-evaluation-harness scores in percent ± standard error, change against the baseline in percentage "
            f"points in brackets; examples per task: {counts}.", "",
            markdown_table(["Layers Removed", *(f"{t} {m} (%)" for t, m in columns)],
                           [[removed_label(row_removal(r)), *(accuracy_cell(r, t, m, 2, stderr=True)
                                                                   for t, m in columns)] for r in rows]), ""]


def report_path(csv_path: str) -> str:
    """One report per CSV, so runs sharing an output folder never overwrite each other's."""
    return f"{os.path.splitext(csv_path)[0]}_report.md"


def write_outputs(rows: Sequence[dict], csv_path: str, plot: bool, mode_report: str | None = None,
                  partial: bool = False, first_header: str | None = None) -> list[str]:
    """report.md (and with ``plot`` the figures) beside ``csv_path``; the paths written.

    The report is written first: a disk that fills while the figures are written leaves it, relinked to the
    figures that were written, and one line. Every file replaces what has its name, a link included
    (utils.files), so a planted link cannot redirect a write outside the folder.
    """
    built = build_figures(rows) if plot else []
    figures = [figure_path(csv_path, kind) for kind, _ in built]
    path = report_path(csv_path)
    report = lambda linked: report_markdown(rows, linked, csv_path, mode_report, partial, first_header)
    _write(path, report(figures), "the report")
    for n, ((_, fig), figure) in enumerate(zip(built, figures)):
        try:
            save_figure(fig, figure)
        except OSError as exc:
            try:
                replace_text(path, report(figures[:n]))
            except OSError:
                pass  # the report stays as written, linking a figure that is missing
            raise WriteError(f"cannot write the figure '{figure}': {exc.strerror or exc}; {path} links the "
                             f"{n} figure{'' if n == 1 else 's'} written before it (--mode report --input "
                             f"{csv_path} draws them again once there is room)") from None
        log.warning(f"Figure written to {figure}")
    log.warning(f"Report written to {path}")
    return [*figures, path]


def _write(path: str, text: str, what: str) -> None:
    try:
        replace_text(path, text)
    except OSError as exc:
        raise WriteError(f"cannot write {what} '{path}': {exc.strerror or exc}; the results file is intact") from None


def check_rows(rows: Sequence[dict], path: str) -> None:
    if not rows:
        raise KitError(f"results file '{path}' has no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise KitError(f"results file '{path}' lacks the column(s) {', '.join(missing)}")
