"""--mode merge: the results files of the --shard jobs of one sweep as one file."""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

from config import RunConfig
from models.units import config_key, removal_order, row_removal
from reporting.csvfile import ResultsFile, read_rows, results_path
from reporting.markdown import write_outputs
from reporting.schema import columns_of, with_changes
from reporting.sidecar import read_sidecar, write_sidecar
from runner.report import first_header
from runner.summary import print_summary
from utils.errors import KitError
from utils.metadata import now

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
            for column in ("model", "dataset", "mode", "eval_tokens", "dtype", "device", "protocol", "patch"):
                if row.get(column) != reference.get(column):
                    raise KitError(f"'{path}' has {column} {row.get(column)!r} but '{first_path}' has "
                                   f"{reference.get(column)!r}; merge only the shards of one sweep")
            if columns_of(row) != columns_of(reference):
                raise KitError(f"'{path}' and '{first_path}' have different task columns (--tasks); merge only the "
                               "shards of one sweep")
            key = config_key(row_removal(row), row.get("patch"))
            if not row_removal(row):
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
    pruned.sort(key=lambda r: removal_order(row_removal(r)))
    return [baseline] + pruned


def missing_shards(paths: Sequence[str]) -> tuple[list[str], int | None]:
    """The shards of the sweep that none of ``paths`` holds ('I/N'), from the files' sidecars, and the
    sweep's planned size; a file without a readable record counts as unknown and is reported."""
    counts, have, sizes = set(), set(), set()
    for path in paths:
        record = read_sidecar(path) or {}
        shard = (record.get("config") or {}).get("output", {}).get("shard")
        if not shard:
            raise KitError(f"'{path}' has no shard record (its .json sidecar is missing, or it is not a --shard "
                           "job's file); pass --allow-partial to merge anyway")
        index, count = (int(part) for part in shard.split("/"))
        counts.add(count)
        have.add(index)
        if record.get("plan_size") is not None:
            sizes.add(record["plan_size"])
    if len(counts) > 1 or len(sizes) > 1:
        raise KitError("the --inputs come from different sweeps (their shard counts or plan sizes differ)")
    count = counts.pop()
    return [f"{i}/{count}" for i in range(count) if i not in have], (sizes.pop() if sizes else None)


def run(config: RunConfig) -> int:
    """Refuse an incomplete set of shards unless --allow-partial; then write one results file."""
    inputs = config.output.inputs
    tables = [(path, read_rows(path)) for path in inputs]
    rows = merge_rows(tables)
    try:
        missing, plan_size = missing_shards(inputs)
        short = plan_size is not None and len(rows) - 1 != plan_size
    except KitError:  # files without shard records, or of different sweeps: completeness unknown
        if not config.output.allow_partial:
            raise
        missing, plan_size, short = [], None, True
    partial = bool(missing) or short  # a complete set stays complete, --allow-partial or not
    if partial and not config.output.allow_partial:
        if missing:
            raise KitError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} of this sweep "
                           f"{'are' if len(missing) > 1 else 'is'} missing from --inputs; pass every shard's file, "
                           "or --allow-partial to merge what is there")
        raise KitError(f"the shards hold {len(rows) - 1} of the sweep's {plan_size} configurations (an "
                       "interrupted shard?); finish it with --resume, or pass --allow-partial")
    if partial:
        log.warning("Merging with --allow-partial: the merged file lacks configurations of the sweep")
    base = rows[0]
    rows = [with_changes(r, base) for r in rows]
    name = f"{base['mode']}-partial" if partial else str(base["mode"])
    out = ResultsFile(results_path(config.output.output_dir, str(base["model"]), name))
    try:
        out.start(columns_of(base))
        for row in rows:
            out.write(row)
    finally:
        out.close()
    log.info(f"Merged {len(rows)} rows from {len(tables)} files")
    print_summary(config, rows)
    log.warning(f"Results written to {out.path}")
    info = {"started": now(), "merged_from": list(inputs), "partial": partial}
    log.warning(f"Run metadata written to {write_sidecar(out.path, config.to_dict(), info)}")
    write_outputs(rows, out.path, plot=config.output.plot, partial=partial, first_header=first_header(rows))
    return 0
