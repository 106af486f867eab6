"""--mode merge: the results files of the --shard jobs of one sweep as one file."""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

from config import RunConfig
from reporting.csvfile import ResultsFile, read_rows, results_path
from reporting.markdown import write_outputs
from reporting.schema import with_changes
from reporting.sidecar import write_sidecar
from runner.summary import print_summary
from utils.errors import KitError
from utils.metadata import now
from utils.text import removal_key

log = logging.getLogger("gpt2-pruning-kit")

# Relative difference allowed between the baselines of shards merged together:
# a different GPU or library build may change the last bits of a float32 sum,
# not more.
BASELINE_RTOL = 1e-6


def merge_rows(tables: Sequence[tuple[str, list[dict]]]) -> list[dict]:
    """One table from the results files of the shards of one sweep.

    Every shard evaluates the baseline; they must agree, and the first is
    kept. Any other configuration must appear once over all the files: a
    repeat means overlapping shards or a file given twice, and picking one of
    two measurements silently would hide that. Rows come back in sweep order
    (fewest removed blocks first, then by block index) with their changes
    recomputed against the kept baseline.
    """
    if not tables:
        raise KitError("--mode merge needs --inputs with at least one results file")
    paths = [os.path.realpath(path) for path, _ in tables]
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise KitError(f"'{tables[i][0]}' is given twice in --inputs")
    first_path, first_rows = tables[0]
    if not first_rows:
        raise KitError(f"'{first_path}' holds no rows")
    reference = first_rows[0]
    baseline: dict | None = None
    seen: dict[str, str] = {}
    pruned: list[dict] = []
    for path, rows in tables:
        for row in rows:
            for column in ("model", "dataset", "mode", "eval_tokens", "protocol"):
                if row.get(column) != reference.get(column):
                    raise KitError(f"'{path}' has {column} {row.get(column)!r} but '{first_path}' has "
                                   f"{reference.get(column)!r}; merge only the shards of one sweep")
            key = removal_key(row["removed_layers"])
            if not row["removed_layers"]:
                if baseline is None:
                    baseline = row
                elif not math.isclose(row["perplexity"], baseline["perplexity"], rel_tol=BASELINE_RTOL):
                    raise KitError(f"the baseline perplexity in '{path}' ({row['perplexity']}) differs from the "
                                   f"first one ({baseline['perplexity']}); the shards did not evaluate the same "
                                   "model and data")
                continue
            if key in seen:
                where = f"in '{path}'" if seen[key] == path else f"in '{seen[key]}' and in '{path}'"
                raise KitError(f"configuration {key} appears twice, {where}; the inputs must be disjoint shards "
                               "of one sweep")
            seen[key] = path
            pruned.append(row)
    if baseline is None:
        raise KitError("none of the --inputs holds a baseline row (removed_layers []); every shard writes one")
    pruned.sort(key=lambda r: (len(r["removed_layers"]), sorted(r["removed_layers"])))
    return [baseline] + pruned


def run(config: RunConfig) -> int:
    inputs = config.output.inputs
    tables = [(path, read_rows(path)) for path in inputs]
    rows = merge_rows(tables)
    base = rows[0]
    rows = [with_changes(r, base) for r in rows]
    out = ResultsFile(results_path(config.output.output_dir, str(base["model"]), str(base["mode"])))
    for row in rows:
        out.write(row)
    log.info(f"Merged {len(rows)} rows from {len(tables)} files")
    print_summary(config, rows)
    log.warning(f"Results written to {out.path}")
    sidecar = write_sidecar(out.path, config.to_dict(), {"started": now(), "merged_from": list(inputs)})
    log.warning(f"Run metadata written to {sidecar}")
    write_outputs(rows, out.path, plot=config.output.plot)
    return 0
