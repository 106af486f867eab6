"""The results CSV: named, created, written row by row and read back."""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import logging
import math
import os
import re
from datetime import datetime

from models.units import config_key, row_removal
from reporting.schema import COLUMNS, EARLIER_COLUMNS, TASK_PREFIX
from utils.errors import KitError, WriteError

log = logging.getLogger("gpt2-pruning-kit")


def results_path(output_dir: str, model: str, mode: str, now: datetime | None = None) -> str:
    """A file name from model, mode and time (ResultsFile makes it unique when it creates the file)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.strip("/\\")).strip("-.") or "model"
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return os.path.join(output_dir, f"{slug}_{mode}_{stamp}.csv")


def pass_checkpoint_path(csv_path: str) -> str:
    """The checkpoint of the perplexity pass under way for a results file (evaluation.passfile), beside it."""
    return os.path.splitext(csv_path)[0] + ".pass.pt"


def _make_dir(folder: str) -> None:
    try:
        os.makedirs(folder or ".", exist_ok=True)
    except FileExistsError:
        raise KitError(f"--output-dir '{folder}' is a file, not a folder") from None
    except OSError as exc:
        raise KitError(f"cannot create --output-dir '{folder}': {exc.strerror}") from None


def claim(path: str) -> str:
    """Create ``path`` (and its folder), or the first free ``<stem>-N.csv`` beside it, and return its name.

    Creating the file exclusively is what makes the name unique: two runs
    started in the same second (a Slurm array) cannot both get it.
    """
    _make_dir(os.path.dirname(path))
    stem, n, candidate = os.path.splitext(path)[0], 1, path
    while True:
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            return candidate
        except FileExistsError:
            candidate, n = f"{stem}-{n}.csv", n + 1
        except OSError as exc:
            raise KitError(f"cannot create a results file in '{os.path.dirname(path) or '.'}': {exc.strerror}") from None


def encode_row(row: dict, columns: list[str] = COLUMNS) -> bytes:
    """One CSV line (with its line ending) as bytes, so that it is written in one piece."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow([_csv_value(row.get(k)) for k in columns])
    return buffer.getvalue().encode("utf-8")


class ResultsFile:
    """The results CSV of one run, held locked for the run's lifetime.

    A new file is created exclusively when the run starts, before any work,
    so an unwritable --output-dir fails at once; ``start`` writes its header
    (or checks a resumed file's) once the columns are known (the task columns
    depend on the tasks lm-eval loads). Each row
    is one write of its encoded line, then fsync: a crash leaves whole rows
    only (at worst an unterminated last line, which read_rows drops). A failed
    write (disk full) is cut back to the rows before it and raised as a
    WriteError. The lock stops a second run from appending to the same file.
    """

    def __init__(self, path: str, resume: bool = False):
        self.resumed = resume
        folder = os.path.dirname(path) or "."
        self.new_folder = None if resume or os.path.isdir(folder) else folder  # removed again by discard
        self.path = path if resume else claim(path)
        self.rows = 0  # rows written by this run
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise KitError(f"cannot open '{self.path}' for writing: {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise KitError(f"'{self.path}' is being written by another run of the kit; wait for it to finish") from None
        self.columns: list[str] = COLUMNS

    def start(self, columns: list[str]) -> None:
        """Write the header of a new file, or check that a resumed file has these columns."""
        self.columns = columns
        if self.resumed:
            self.columns = check_columns(self.path, columns)
            if len(self.columns) < len(columns):
                log.warning(f"'{self.path}' has the columns of an earlier version of the kit: its new rows leave out "
                            f"{', '.join(c for c in columns if c not in self.columns)} (start a new file to have them)")
        else:
            self._append(encode_row(dict(zip(columns, columns)), columns), "its header")

    def _append(self, data: bytes, what: str) -> None:
        size = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(self.fd)
        except OSError as exc:
            os.ftruncate(self.fd, size)  # no half row
            raise WriteError(f"cannot write {what} to '{self.path}': {exc.strerror}; the rows already in it "
                             "are intact (continue with --resume once there is room)") from None

    def write(self, row: dict) -> None:
        self._append(encode_row(row, self.columns), "a row")
        self.rows += 1

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None

    def discard(self) -> None:
        """Remove a file this run created and wrote no row to (the run failed before its first result)."""
        self.close()
        if not self.resumed and not self.rows:
            for path in (self.path, os.path.splitext(self.path)[0] + ".json", pass_checkpoint_path(self.path)):
                if os.path.exists(path):
                    os.remove(path)
            if self.new_folder and not os.listdir(self.new_folder):
                os.rmdir(self.new_folder)


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else ("-inf" if value < 0 else "nan"))
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def read_rows(path: str) -> list[dict]:
    """Rows of a results CSV, with numbers parsed back (empty cells -> None).

    A half-written last row (no line ending: a crash while writing it) is
    ignored with a warning; a row with missing or extra cells is refused.
    """
    if not os.path.isfile(path):
        raise KitError(f"results file '{path}' does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise KitError(f"'{path}' is not a UTF-8 results file ({exc.reason} at byte {exc.start})") from None
    complete = complete_part(text)
    if len(complete) < len(text):
        log.warning(f"'{path}' ends in a half-written row (a crash while writing it); that row is ignored")
    reader = csv.DictReader(io.StringIO(complete, newline=""))
    if reader.fieldnames is None or "removed_layers" not in reader.fieldnames:
        raise KitError(f"'{path}' is not a results file of this kit (no removed_layers column)")
    rows = []
    for raw in reader:
        if None in raw:  # more cells than the header names
            raise KitError(f"'{path}' has a row with more cells than its header (line {reader.line_num})")
        if any(v is None for v in raw.values()):
            raise KitError(f"'{path}' has a row with fewer cells than its header (line {reader.line_num})")
        row = {k: _parse(v) for k, v in raw.items()}
        try:
            row["removed_layers"] = [int(i) for i in json.loads(raw["removed_layers"])]
        except (ValueError, TypeError):
            raise KitError(f"'{path}' has a malformed removed_layers value: {raw['removed_layers']!r}") from None
        if raw.get("removed_units"):
            try:
                row["removed_units"] = [str(u) for u in json.loads(raw["removed_units"])]
            except (ValueError, TypeError):
                raise KitError(f"'{path}' has a malformed removed_units value: {raw['removed_units']!r}") from None
        rows.append(row)
    return rows


def check_unique(rows: list[dict], path: str) -> None:
    """Each configuration once: a repeat means two runs wrote to the file at once, and its rows cannot be trusted."""
    seen: set[str] = set()
    for row in rows:
        key = config_key(row_removal(row), row.get("patch"))
        if key in seen:
            raise KitError(f"'{path}' holds configuration {key} twice (two runs wrote to it at once?); "
                           "start a new file")
        seen.add(key)


def complete_part(text: str) -> str:
    """``text`` up to its last line ending: a row without one was cut off mid-write."""
    return text if not text or text.endswith("\n") else text[: text.rfind("\n") + 1]


def drop_partial_row(path: str) -> bool:
    """Cut a half-written last row off a results file (before resuming it); whether there was one."""
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.endswith(b"\n"):
        return False
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
    return True


def check_columns(path: str, columns: list[str] | None = None) -> list[str]:
    """A file is resumed only if it has this run's columns (this version's, and the same --tasks' task
    columns), in order: rows are appended in that order. A file of the version before the pass columns
    (EARLIER_COLUMNS) is resumed too, its new rows without them. Without ``columns``, only the fixed ones
    are checked. The columns rows are to be written in: the file's header."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
            for _ in f:  # the whole file: a byte that is not UTF-8 anywhere stops here, not mid-run
                pass
    except UnicodeDecodeError as exc:
        raise KitError(f"'{path}' is not a UTF-8 results file ({exc.reason} at byte {exc.start}); it was changed "
                       "or damaged after the kit wrote it") from None
    fixed = COLUMNS if header[: len(COLUMNS)] == COLUMNS else EARLIER_COLUMNS
    if not header or header == columns or (columns is None and header[: len(fixed)] == fixed):
        return header or columns or COLUMNS
    if columns is not None and header[: len(fixed)] == fixed:
        if header[len(fixed):] == columns[len(COLUMNS):]:
            return header  # an earlier version's file: its columns, the same tasks
        tasks = lambda cols, n: sorted({c[len(TASK_PREFIX):].rsplit(":", 1)[0] for c in cols[n:]
                                        if c.startswith(TASK_PREFIX)})
        theirs, ours = tasks(header, len(fixed)), tasks(columns, len(COLUMNS))
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
