"""What a run prints when it ends: the mode's own report, the sweep table and key observations."""

from __future__ import annotations

from config import RunConfig
from pruning.choice import Choice
from reporting.tables import comparison_table, observations, sweep_table, task_table


def print_summary(config: RunConfig, rows: list[dict], choice: Choice | None = None) -> None:
    if config.output.quiet:
        return
    if config.mode == "random" and len(rows) == 2:
        print(f"\nRandom Layer Removal (seed {config.seed}, removed blocks {rows[1]['removed_layers']})\n")
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
