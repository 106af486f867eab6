"""The results CSV: named, created, written row by row and read back."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from datetime import datetime

from reporting.schema import COLUMNS, TASK_PREFIX
from utils.errors import KitError


def results_path(output_dir: str, model: str, mode: str, now: datetime | None = None) -> str:
    """A file name from model, mode and time (ResultsFile makes it unique when it creates the file)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.strip("/\\")).strip("-.") or "model"
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return os.path.join(output_dir, f"{slug}_{mode}_{stamp}.csv")


def claim(path: str) -> str:
    """Create ``path``, or the first free ``<stem>-N.csv`` beside it, and return its name.

    Creating the file exclusively is what makes the name unique: two runs
    started in the same second (a Slurm array) cannot both get it.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stem, n, candidate = os.path.splitext(path)[0], 1, path
    while True:
        try:
            with open(candidate, "x", encoding="utf-8"):
                return candidate
        except FileExistsError:
            candidate, n = f"{stem}-{n}.csv", n + 1


class ResultsFile:
    """Appends rows to a CSV, flushing each one to disk as it is written.

    The file is created only when the first row arrives, so a run that fails
    on bad input leaves nothing behind; a crash loses at most the row being
    evaluated.
    """

    def __init__(self, path: str, exclusive: bool = True, columns: list[str] | None = None):
        self.path = path
        self.exclusive = exclusive  # a new file of its own (else: appending to --resume's file)
        self.columns = columns or COLUMNS  # COLUMNS, then any task columns (reporting.schema.task_columns)
        self.rows = 0

    def write(self, row: dict) -> None:
        if self.exclusive and not self.rows:
            self.path = claim(self.path)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _csv_value(row.get(k)) for k in self.columns})
            f.flush()
            os.fsync(f.fileno())
        self.rows += 1


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else ("-inf" if value < 0 else "nan"))
    return value


def read_rows(path: str) -> list[dict]:
    """Rows of a results CSV, with numbers parsed back (empty cells -> None)."""
    if not os.path.isfile(path):
        raise KitError(f"results file '{path}' does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "removed_layers" not in reader.fieldnames:
                raise KitError(f"'{path}' is not a results file of this kit (no removed_layers column)")
            rows = []
            for raw in reader:
                if None in raw:  # more cells than the header names
                    raise KitError(f"'{path}' has a row with more cells than its header (line {reader.line_num})")
                row = {k: _parse(v) for k, v in raw.items()}
                try:
                    row["removed_layers"] = [int(i) for i in json.loads(raw["removed_layers"])]
                except (ValueError, TypeError):
                    raise KitError(f"'{path}' has a malformed removed_layers value: {raw['removed_layers']!r}") from None
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise KitError(f"'{path}' is not a UTF-8 results file ({exc.reason} at byte {exc.start})") from None
    return rows


def check_columns(path: str, columns: list[str] | None = None) -> None:
    """A file is resumed only if it has this run's columns (this version's, and the same --tasks' task
    columns), in order: rows are appended in that order."""
    columns = columns or COLUMNS
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if not header or header == columns:
        return
    if header[: len(COLUMNS)] == COLUMNS:
        tasks = lambda cols: sorted({c[len(TASK_PREFIX):].rsplit(":", 1)[0] for c in cols[len(COLUMNS):]
                                     if c.startswith(TASK_PREFIX)})
        theirs, ours = tasks(header), tasks(columns)
        if theirs != ours:
            raise KitError(f"--resume file '{path}' has the task columns of --tasks {','.join(theirs) or '(none)'}, "
                           f"this run scores {','.join(ours) or 'no tasks'}: resume with the same --tasks, or start a "
                           "new file")
    raise KitError(f"--resume file '{path}' has other columns than this version of the kit writes; "
                   "finish it with the version that started it, or start a new file")


def _parse(value: str | None):
    if value is None or value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
