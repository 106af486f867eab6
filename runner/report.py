"""--mode report: figures and report.md again from a saved results CSV, beside it."""

from __future__ import annotations

from config import RunConfig
from models.units import row_removal
from reporting.csvfile import check_unique, read_rows
from reporting.markdown import check_rows, write_outputs
from reporting.schema import with_changes
from reporting.sidecar import read_sidecar
from runner.modes import MODES


def run(config: RunConfig) -> int:
    path = config.output.input
    rows = read_rows(path)
    check_rows(rows, path)
    check_unique(rows, path)
    # a file written by hand or by another tool may lack the change columns: recomputed against its
    # baseline row, or left empty without one
    base = next((r for r in rows if not row_removal(r)), None)
    record = read_sidecar(path) or {}  # what the run kept beside the rows (a choosing mode's own report)
    write_outputs([with_changes(r, base) for r in rows], path, plot=True, mode_report=record.get("mode_report"),
                  partial=bool(record.get("partial")), first_header=first_header(rows))
    return 0


def first_header(rows: list[dict]) -> str | None:
    """The sweep table's first column as the rows' mode names it."""
    mode = MODES.get(str(rows[0].get("mode")))
    return mode.first_header if mode else None
