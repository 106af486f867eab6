"""What a run prints when it ends: the mode's own report, the sweep table and key observations."""

from __future__ import annotations

from config import RunConfig
from models.units import is_whole_blocks, row_removal
from reporting.tables import comparison_table, observations, sweep_table, task_table, units_phrase
from runner.modes import MODES


def removed_phrase(row: dict) -> str:
    """'removed blocks [1, 3]' as the seed printed it; with sublayers 'removed units 1, attn3'."""
    removal = row_removal(row)
    return f"removed blocks {list(removal)}" if is_whole_blocks(removal) else f"removed {units_phrase(removal)}"


def print_summary(config: RunConfig, rows: list[dict], mode_report: str | None = None,
                  with_table: bool = True) -> None:
    """``mode_report``: a choosing mode's own report (pruning.choice.Choice.report), printed before the table."""
    if config.output.quiet:
        return
    if MODES[config.mode].comparison and len(rows) == 2:
        print(f"\n{config.mode.capitalize()} Layer Removal (seed {config.seed}, {removed_phrase(rows[1])})\n")
        print(comparison_table(rows[0], rows[1]))
    if mode_report:
        print("\n" + mode_report)
    if with_table:
        print("\n" + sweep_table(rows))
    tasks = task_table(rows)
    if tasks:
        print("\nDownstream tasks (lm-eval; % correct, change against the baseline in points)\n\n" + tasks)
    notes = observations(rows)
    if notes:
        print("\nKey observations:\n" + "\n".join(f"- {n}" for n in notes))
