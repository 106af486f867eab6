"""Labels and plain-text tables, shared by every floor that prints something."""

from __future__ import annotations

import json
import math
from typing import Iterable, Sequence


def removal_key(removed: Sequence) -> str:
    """A removal set as JSON text, the key rows are matched by: whole blocks as the sorted list the
    removed_layers column stores ("[1, 3]"); a set with sublayers (in canonical order, models.units) as
    its unit names ("[\"block1\", \"attn3\"]")."""
    if all(isinstance(i, int) for i in removed):
        return json.dumps(sorted(int(i) for i in removed))
    return json.dumps([f"block{u}" if isinstance(u, int) else u for u in removed])


def config_key(removed: Sequence, patch: str | None = None) -> str:
    """The key of a row's configuration: its removal_key, and the --patch method when one was applied
    (a patched set is another model than the same set plain); no method, '' and 'none' are plain."""
    key = removal_key(removed)
    return key if patch in (None, "", "none") else f"{key} patch={patch}"


def removed_label(removed: Sequence) -> str:
    """'1, 3' for blocks; sublayers by name: '1, attn3'."""
    return ", ".join(map(str, removed)) if removed else "None"


def compact_label(removed: Sequence) -> str:
    """Removed blocks with consecutive runs as ranges, then sublayers: [0, 1, 2, 5, 'mlp7'] -> '0-2,5,mlp7'."""
    if not removed:
        return "None"
    named = [u for u in removed if not isinstance(u, int)]
    blocks = [u for u in removed if isinstance(u, int)]
    runs: list[list[int]] = []
    for i in sorted(blocks):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join([*(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs), *named])


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


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned (labels), the rest right-aligned."""
    rows = [list(r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
