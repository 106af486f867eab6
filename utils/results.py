"""Result rows: the CSV file (written row by row), resuming it, and the
console tables in the shape the seed README made familiar."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from datetime import datetime
from typing import Iterable, Sequence

from utils.errors import KitError

COLUMNS = [
    "mode", "model", "dataset", "removed_layers", "num_removed", "num_layers", "perplexity", "ppl_change_pct",
    "params", "params_m", "params_change_pct", "latency_ms", "latency_iqr_ms", "prefill_ms", "tokens_per_s",
    "speed_change_pct", "eval_tokens", "device", "dtype", "timestamp",
    # modes that choose blocks on calibration tokens (importance, greedy, beam, compare); empty otherwise
    "metric", "scores",
]


def change_pct(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0 or math.isnan(reference):
        return None
    if math.isinf(value) or math.isinf(reference):
        return math.inf if value > reference else (0.0 if value == reference else -100.0)
    return (value - reference) / reference * 100.0


def with_changes(row: dict, base: dict) -> dict:
    """``row`` with its change columns against the baseline row ``base``."""
    return {**row,
            "ppl_change_pct": change_pct(row["perplexity"], base["perplexity"]),
            "params_change_pct": change_pct(row.get("params"), base.get("params")),
            "speed_change_pct": change_pct(row.get("latency_ms"), base.get("latency_ms"))}


def removal_key(removed: Sequence[int]) -> str:
    return json.dumps(sorted(int(i) for i in removed))


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

    def __init__(self, path: str, exclusive: bool = True):
        self.path = path
        self.exclusive = exclusive  # a new file of its own (else: appending to --resume's file)
        self.rows = 0

    def write(self, row: dict) -> None:
        if self.exclusive and not self.rows:
            self.path = claim(self.path)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _csv_value(row.get(k)) for k in COLUMNS})
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


def check_columns(path: str) -> None:
    """A file is resumed only if it has this version's columns, in order: rows are appended in that order."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if header and header != COLUMNS:
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


# ---- console output -------------------------------------------------------------------------

# The final table must fit a standard terminal without wrapping.
CONSOLE_WIDTH = 80
# Widest number cell in the console table: larger values lose decimals, then go scientific.
CONSOLE_NUMBER_WIDTH = 10


def format_number(value: float | None, digits: int = 2, sign: bool = False, width: int | None = None) -> str:
    """A number as the seed's tables show it; within ``width`` characters when given."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "+inf" if sign and value > 0 else ("inf" if value > 0 else "-inf")
    plus = "+" if sign else ""
    text = f"{value:{plus},.{digits}f}"
    if width is not None and len(text) > width:
        text = f"{value:{plus},.0f}"
        if len(text) > width:
            text = f"{value:{plus}.3g}"
    return text


def removed_label(removed: Sequence[int]) -> str:
    return ", ".join(map(str, removed)) if removed else "None"


def compact_label(removed: Sequence[int]) -> str:
    """Removed blocks with consecutive runs as ranges: [0, 1, 2, 5] -> '0-2,5'."""
    if not removed:
        return "None"
    runs: list[list[int]] = []
    for i in sorted(removed):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def sweep_cells(rows: Sequence[dict], width: int | None = None) -> list[list[str]]:
    """One row of cells per configuration, shared by the console table and report.md.

    ``width`` caps each number cell (console); None keeps every decimal (report).
    """
    label = removed_label if width is None else compact_label
    return [[
        label(r["removed_layers"]), str(r["num_layers"]), format_number(r["perplexity"], width=width),
        format_number(r.get("latency_ms"), width=width), format_number(r.get("params_m"), width=width),
        format_number(r.get("ppl_change_pct"), sign=True, width=width), format_number(r.get("speed_change_pct"), sign=True, width=width),
    ] for r in rows]


def sweep_table(rows: Sequence[dict], width: int = CONSOLE_WIDTH) -> str:
    """The seed's sweep table in at most ``width`` columns.

    Number cells are capped at CONSOLE_NUMBER_WIDTH; the removed-blocks column
    takes the room left and cuts longer labels with '..' (the CSV has them whole).
    """
    headers = ["Removed", "Layers", "PPL", "Speed (ms)", "Params (M)", "PPL chg %", "Speed chg %"]
    cells = sweep_cells(rows, width=CONSOLE_NUMBER_WIDTH)
    others = sum(max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers) if i)
    room = max(len(headers[0]), width - others - 2 * (len(headers) - 1))
    for c in cells:
        if len(c[0]) > room:
            c[0] = c[0][: room - 2] + ".."
    return format_table(headers, cells)


def comparison_cells(original: dict, pruned: dict) -> list[list[str]]:
    """Original against one pruned model, metric by metric (the seed's 'Random Layer Removal')."""
    metrics = [("Perplexity", "perplexity"), ("Inference Speed (ms)", "latency_ms"),
               ("Parameters (M)", "params_m"), ("Layers", "num_layers")]
    body = []
    for label, key in metrics:
        a, b = original.get(key), pruned.get(key)
        digits = 0 if key == "num_layers" else 2
        body.append([label, format_number(a, digits), format_number(b, digits), format_number(change_pct(b, a), sign=True)])
    return body


COMPARISON_HEADERS = ["Metric", "Original Model", "Pruned Model", "Change (%)"]


def comparison_table(original: dict, pruned: dict) -> str:
    return format_table(COMPARISON_HEADERS, comparison_cells(original, pruned))


def observations(rows: Sequence[dict]) -> list[str]:
    """A few sentences a reader would otherwise work out from the table."""
    pruned = [r for r in rows if r["removed_layers"]]
    if not pruned:
        return []
    label = lambda r: ("block " if len(r["removed_layers"]) == 1 else "blocks ") + removed_label(r["removed_layers"])
    worst = max(pruned, key=lambda r: r["perplexity"])
    best = min(pruned, key=lambda r: r["perplexity"])
    notes = []
    if len(pruned) > 1:
        notes.append(f"Most harmful: removing {label(worst)} (PPL {format_number(worst['perplexity'])}, "
                     f"{format_number(worst['ppl_change_pct'], sign=True)}%)")
    notes.append(f"Least harmful: removing {label(best)} (PPL {format_number(best['perplexity'])}, "
                 f"{format_number(best['ppl_change_pct'], sign=True)}%)")
    timed = [r for r in pruned if r.get("latency_ms") is not None]
    if timed:
        fast = min(timed, key=lambda r: r["latency_ms"])
        notes.append(f"Fastest: removing {label(fast)} ({format_number(fast['latency_ms'])} ms, "
                     f"{format_number(fast['speed_change_pct'], sign=True)}%)")
    return notes
