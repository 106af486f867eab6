"""Results: the CSV and its sidecar, the printed tables, report.md and the figures."""
