"""What a run prints when it ends: the mode's own report, the sweep table and key observations."""

from __future__ import annotations

from config import RunConfig
from models.units import is_whole_blocks, row_removal, unit_names
from pruning.choice import Choice
from reporting.tables import comparison_table, observations, sweep_table, task_table


def removed_phrase(row: dict) -> str:
    removal = row_removal(row)
    if is_whole_blocks(removal):
        return f"removed blocks {list(removal)}"
    return f"removed units {unit_names(removal)}"


def print_summary(config: RunConfig, rows: list[dict], choice: Choice | None = None) -> None:
    if config.output.quiet:
        return
    if config.mode == "random" and len(rows) == 2:
        print(f"\nRandom Layer Removal (seed {config.seed}, {removed_phrase(rows[1])})\n")
        print(comparison_table(rows[0], rows[1]))
    if choice and choice.report:
        print("\n" + choice.report(rows))
    if not choice or choice.sweep_table:
        print("\n" + sweep_table(rows))
    tasks = task_table(rows)
    if tasks:
        print("\nDownstream tasks (lm-eval; % correct, change against the baseline in points)\n\n" + tasks)
    notes = observations(rows)
    if notes:
        print("\nKey observations:\n" + "\n".join(f"- {n}" for n in notes))
