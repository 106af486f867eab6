"""Labels and plain-text tables, shared by every floor that prints something."""

from __future__ import annotations

import math
from typing import Iterable, Sequence


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


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 window', '1,308 windows': the count with its noun in the right number."""
    return f"{count:,} {noun if count == 1 else (many or noun + 's')}"


def minutes(seconds: float) -> str:
    """A duration as a reader wants it in a hint: 'under a minute', 'about 1 minute', 'about 24 minutes'."""
    whole = round(seconds / 60)
    return "under a minute" if whole < 1 else f"about {plural(whole, 'minute')}"
