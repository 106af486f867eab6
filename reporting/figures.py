"""Figures of a results CSV, drawn from its rows alone so that
`--mode report` can make them again from any saved file.

Which figures a file gets depends on what its rows hold, not on the mode
name, so modes added later (importance, compare, ...) get the figures their
data supports: single-block removals give the per-block figure, removals of
several depths the trade-off figure, pairs the heatmap, score columns the
importance figure. Figures are built on matplotlib.figure.Figure directly
(Agg renderer, no pyplot), so nothing global changes and nothing leaks.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Callable, Sequence

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from models.units import SUBLAYERS, Unit, canonical, compact_label, is_whole_blocks, row_removal, unit_order
from pruning.rules import RULES
from reporting.schema import speed_within_noise, task_column
from reporting.tables import accuracy_headers
from utils.files import replace_file


log = logging.getLogger("gpt2-pruning-kit")

DPI = 120
# Above this many blocks, heatmap cells are too small for numbers and bar labels turn sideways.
ANNOTATE_MAX_BLOCKS = 12
# The most index labels one axis shows; the others keep their tick without a label.
MAX_TICK_LABELS = 12


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _ratio_text(ratio: float, _pos=None) -> str:
    """A tick of the PPL / baseline axis: a percentage near 1, a factor beyond 2x."""
    if ratio >= 2 or ratio <= 0.5:
        return f"×{ratio:g}"
    return f"{(ratio - 1) * 100:+.2g}%"


def _value_text(value: float, _pos=None) -> str:
    """A perplexity as a tick label: thousands separated, at most 4 significant digits below 1,000."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


def _cell_text(value: float) -> str:
    return "inf" if math.isinf(value) else (f"{value:,.0f}" if value >= 1000 else f"{value:.1f}")


def _log_ticks(axis, low: float, high: float, text=_value_text) -> None:
    """Plain-number labels on a log axis; within one decade the minor ticks are
    the only ones, so they are labelled too."""
    axis.set_major_formatter(FuncFormatter(text))
    axis.set_minor_formatter(FuncFormatter(text) if high < 10 * low else NullFormatter())


def _index_ticks(ax, values: Sequence[int]) -> None:
    """A tick at every block index, labelled at every k-th so that at most MAX_TICK_LABELS labels share the
    axis (30 labels in a row ran together into "272829")."""
    step = math.ceil(len(values) / MAX_TICK_LABELS)
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) if i % step == 0 else "" for i, v in enumerate(values)])


def _label(removed: Sequence[int]) -> str:
    return compact_label(removed) if removed else "none"


def depth(rows: Sequence[dict]) -> int:
    """Blocks of the unpruned model: kept plus removed, the same on every row."""
    r = rows[0]
    return int(r["num_layers"]) + len(r["removed_layers"])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (lower is better),
    ordered by the first coordinate; of identical points only the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def single_removals(rows: Sequence[dict]) -> dict[int, dict]:
    """The first row removing each block alone, by block."""
    singles: dict[int, dict] = {}
    for r in rows:
        if len(r["removed_layers"]) == 1:
            singles.setdefault(r["removed_layers"][0], r)
    return singles


def per_block_figure(rows: Sequence[dict]) -> Figure | None:
    """PPL change for removing each block alone (log scale), latency change beside it."""
    singles = single_removals(rows)
    if len(singles) < 2:
        return None
    blocks = sorted(singles)
    timed = [b for b in blocks if _finite(singles[b].get("speed_change_pct"))]
    fig = Figure(figsize=(12 if timed else 6.5, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 2 if timed else 1, 1)
    # Bars grow from 1 (no change) to PPL / baseline PPL, so improvements and
    # thousand-fold degradations are both readable on one log axis.
    finite = [b for b in blocks if _finite(singles[b].get("ppl_change_pct"))]
    ratios = [1 + singles[b]["ppl_change_pct"] / 100 for b in finite]
    ax.bar(finite, [r - 1 for r in ratios], bottom=1, color=["#c0392b" if r > 1 else "#2e86c1" for r in ratios])
    ax.set_yscale("log")
    _log_ticks(ax.yaxis, min([1.0, *ratios]), max([1.0, *ratios]), _ratio_text)
    ax.axhline(1, color="black", linewidth=0.8)
    many = len(blocks) > ANNOTATE_MAX_BLOCKS
    for b, r in zip(finite, ratios):
        ax.annotate(f"{(r - 1) * 100:+,.2f}%", (b, r), ha="center", va="bottom" if r >= 1 else "top", fontsize=7,
                    rotation=90 if many else 0)
    for b in blocks:
        if b not in finite:
            ax.annotate("inf", (b, 1), xytext=(0, 4), textcoords="offset points", ha="center", color="#c0392b")
    _index_ticks(ax, blocks)
    ax.set_xlabel("removed block")
    ax.set_ylabel("perplexity change (log scale of PPL / baseline)")
    ax.set_title("Perplexity change")
    if timed:
        ax2 = fig.add_subplot(1, 2, 2)
        _speed_bars(ax2, [singles[b] for b in timed], timed)
        _index_ticks(ax2, blocks)
        ax2.set_xlabel("removed block")
    fig.suptitle(f"{rows[0].get('model', '')}: removing one block at a time")
    return fig


def _speed_bars(ax, rows: Sequence[dict], xs: Sequence) -> None:
    """Latency changes with their 95% intervals (evaluation.latency): a bar whose
    interval includes 0 is within the timing noise and drawn pale, so that no
    bar claims a speed-up the timing cannot tell from none."""
    changes = [r["speed_change_pct"] for r in rows]
    noise = [speed_within_noise(r) for r in rows]
    colors = ["#d5d8dc" if n else ("#27ae60" if c < 0 else "#7f8c8d") for c, n in zip(changes, noise)]
    ax.bar(xs, changes, color=colors, edgecolor="#7f8c8d", linewidth=0.5)
    with_interval = [(x, r) for x, r, n in zip(xs, rows, noise) if n is not None]
    if with_interval:
        centre = np.array([r["speed_change_pct"] for _, r in with_interval])
        low = np.array([r["speed_change_low_pct"] for _, r in with_interval])
        high = np.array([r["speed_change_high_pct"] for _, r in with_interval])
        ax.errorbar([x for x, _ in with_interval], centre, yerr=[centre - low, high - centre], fmt="none",
                    ecolor="black", capsize=3, linewidth=0.8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("latency change (%)" + (", 95% interval" if with_interval else ""))
    ax.set_title("Latency change (negative is faster)" + ("; pale: within the noise" if any(noise) else ""))


def single_units(rows: Sequence[dict]) -> dict[tuple[int, str], dict]:
    """The first row removing each unit alone, by (block, 'block' | 'attn' | 'mlp')."""
    singles: dict[tuple[int, str], dict] = {}
    for r in rows:
        removal = row_removal(r)
        if len(removal) == 1:
            singles.setdefault((removal[0].block, removal[0].part), r)
    return singles


def per_unit_figure(rows: Sequence[dict]) -> Figure | None:
    """PPL change for removing each attention and each MLP alone (and each block, where the file has it),
    side by side per block, on the log scale of the per-block figure."""
    singles = single_units(rows)
    kinds = [k for k in ("attn", "mlp", "block") if any(kind == k for _, kind in singles)]
    if not any(k in kinds for k in SUBLAYERS) or len(singles) < 2:
        return None
    blocks = sorted({i for i, _ in singles})
    fig = Figure(figsize=(max(6.5, 0.9 * len(blocks) * len(kinds) / 2 + 3), 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(kinds)
    colours = {"attn": "#2e86c1", "mlp": "#e67e22", "block": "#7f8c8d"}
    ratios_all = [1.0]
    for n, kind in enumerate(kinds):
        xs, ratios = [], []
        for b in blocks:
            change = singles.get((b, kind), {}).get("ppl_change_pct")
            if _finite(change):
                xs.append(b - 0.4 + width * (n + 0.5))
                ratios.append(1 + change / 100)
        ax.bar(xs, [r - 1 for r in ratios], width=width, bottom=1, color=colours[kind],
               label={"attn": "attention", "mlp": "MLP", "block": "whole block"}[kind])
        ratios_all += ratios
    ax.set_yscale("log")
    _log_ticks(ax.yaxis, min(ratios_all), max(ratios_all), _ratio_text)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.set_ylabel("perplexity change (log scale of PPL / baseline)")
    ax.legend()
    fig.suptitle(f"{rows[0].get('model', '')}: removing one attention or MLP at a time")
    return fig


def tradeoff_figure(rows: Sequence[dict]) -> Figure | None:
    """Perplexity against kept blocks and against latency, with the Pareto frontier labelled."""
    if len({len(r["removed_layers"]) for r in rows if r["removed_layers"]}) < 2:
        return None
    shown = [r for r in rows if _finite(r["perplexity"])]
    axes_spec = [("num_layers", "kept blocks")]
    if any(_finite(r.get("latency_ms")) for r in shown):
        axes_spec.append(("latency_ms", "latency (ms)"))
    fig = Figure(figsize=(6.5 * len(axes_spec), 5), layout="constrained")
    for n, (key, xlabel) in enumerate(axes_spec, start=1):
        ax = fig.add_subplot(1, len(axes_spec), n)
        points = [r for r in shown if _finite(r.get(key))]
        pruned = [r for r in points if r["removed_layers"]]
        base = [r for r in points if not r["removed_layers"]]
        ax.scatter([r[key] for r in pruned], [r["perplexity"] for r in pruned], s=16, alpha=0.6,
                   color="#2e86c1", label="configuration")
        if base:
            ax.scatter([r[key] for r in base], [r["perplexity"] for r in base], s=90, marker="*",
                       color="black", label="baseline", zorder=3)
        front = [points[i] for i in pareto_front([(r[key], r["perplexity"]) for r in points])]
        ax.plot([r[key] for r in front], [r["perplexity"] for r in front], "-o", color="#c0392b", markersize=5,
                label="Pareto frontier", zorder=2)
        for r in front:
            ax.annotate(_label(r["removed_layers"]), (r[key], r["perplexity"]), xytext=(4, 4),
                        textcoords="offset points", fontsize=8, color="#c0392b")
        ax.set_yscale("log")
        if points:
            _log_ticks(ax.yaxis, min(r["perplexity"] for r in points), max(r["perplexity"] for r in points))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"Perplexity against {xlabel} (labels: removed blocks)")
        ax.legend(loc="upper right", fontsize=8)
        if key == "num_layers":
            _index_ticks(ax, sorted({int(r[key]) for r in points}))
    hidden = len(rows) - len(shown)
    note = f" ({hidden} with infinite perplexity not shown)" if hidden else ""
    fig.suptitle(f"{rows[0].get('model', '')}: {len(rows)} configurations{note}")
    return fig


def pair_matrix(rows: Sequence[dict]) -> np.ndarray:
    """Perplexity with blocks i and j removed at [i, j] and [j, i]; single removals on the
    diagonal; NaN where the file has no such configuration."""
    n = depth(rows)
    matrix = np.full((n, n), np.nan)
    for r in rows:
        removed = r["removed_layers"]
        if len(removed) in (1, 2) and r["perplexity"] is not None:
            i, j = removed[0], removed[-1]
            matrix[i, j] = matrix[j, i] = r["perplexity"]
    return matrix


def pair_heatmap(rows: Sequence[dict]) -> Figure | None:
    """Perplexity for every pair of removed blocks (colour on a log scale)."""
    if sum(len(r["removed_layers"]) == 2 for r in rows) < 2:
        return None
    matrix = pair_matrix(rows)
    shown = np.ma.masked_invalid(matrix)
    finite = matrix[np.isfinite(matrix)]
    if not finite.size:  # every pair overflowed: nothing to colour
        return None
    low, high = float(finite.min()), float(finite.max())
    n = len(matrix)
    fig = Figure(figsize=(max(5.5, 0.45 * n + 3), max(4.5, 0.45 * n + 2)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=low, vmax=high if high > low else low * 1.001))
    bar = fig.colorbar(image, ax=ax, label="perplexity (log scale)")
    _log_ticks(bar.ax.yaxis, low, high)
    if n <= ANNOTATE_MAX_BLOCKS:
        middle = math.sqrt(low * high)
        for i in range(n):
            for j in range(n):
                v = matrix[i, j]
                if np.isnan(v):
                    continue
                ax.text(j, i, _cell_text(v), ha="center", va="center", fontsize=7,
                        color="white" if np.isfinite(v) and v < middle else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("removed block")
    ax.set_ylabel("removed block")
    ax.set_title(f"{rows[0].get('model', '')}: perplexity with two blocks removed\n"
                 "(diagonal: one block; blank: not evaluated)", fontsize=10)
    return fig


def importance_scores(rows: Sequence[dict]) -> dict[str, dict[Unit, float]]:
    """Per-unit scores by metric (units: blocks, or attnN / mlpN with --unit), from the ``scores`` cells
    the choosing modes write.

    importance, greedy and beam rows hold their rule's candidates keyed by
    removal set (only single units are per-unit scores); compare's
    single-removal rows hold every one-pass score of their unit, keyed by metric.
    """
    scores: dict[str, dict[Unit, float]] = {}
    for r in rows:
        if not isinstance(r.get("scores"), str):
            continue
        removed = row_removal(r)
        for key, value in json.loads(r["scores"]).items():
            if not _finite(value):
                continue
            if key.startswith("["):
                candidate = canonical(str(u) for u in json.loads(key))
                if len(candidate) == 1:
                    scores.setdefault(r["metric"], {})[candidate[0]] = float(value)
            elif len(removed) == 1:
                scores.setdefault(key, {})[removed[0]] = float(value)
    return scores


def importance_figure(rows: Sequence[dict]) -> Figure | None:
    """Each metric's per-unit scores side by side (each on its own scale)."""
    scores = importance_scores(rows)
    if not scores:
        return None
    fig = Figure(figsize=(4.5 * len(scores) + 1, 4), layout="constrained")
    # the scoring rules in registry order, then the searches' candidate scores
    order = [m for m in RULES if m in scores] + sorted(m for m in scores if m not in RULES)
    blocks_only = all(is_whole_blocks(metric) for metric in scores.values())
    for n, metric in enumerate(order, start=1):
        ax = fig.add_subplot(1, len(scores), n)
        units = sorted(scores[metric], key=lambda u: unit_order((u,)))
        # blocks at their index; units one after another, named
        xs = [u.block for u in units] if blocks_only else list(range(len(units)))
        ax.bar(xs, [scores[metric][u] for u in units], color="#8e44ad")
        ax.set_xticks(xs)
        if not blocks_only:
            ax.set_xticklabels([u.name for u in units], rotation=90, fontsize=7)
        ax.set_xlabel("block" if blocks_only else "unit")
        ax.set_ylabel("score")
        ax.set_title(metric)
    fig.suptitle(f"{rows[0].get('model', '')}: {'block' if blocks_only else 'unit'} importance scores")
    return fig


def tasks_figure(rows: Sequence[dict]) -> Figure | None:
    """Each task's score per configuration (with its standard error), perplexity of the same
    configurations beside it, so a collapse on a task that perplexity hides is visible."""
    columns = accuracy_headers(rows)
    if not columns:
        return None
    x = np.arange(len(rows))
    labels = [_label(row_removal(r)) for r in rows]
    fig = Figure(figsize=(max(11, 0.5 * len(rows) + 6), 4.8), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    offsets = np.linspace(-0.2, 0.2, len(columns)) if len(columns) > 1 else [0.0]
    for (task, metric), dx in zip(columns, offsets):
        values = [r.get(task_column(task, metric)) for r in rows]
        errors = [r.get(task_column(task, f"{metric}_stderr")) for r in rows]
        shown = [i for i, v in enumerate(values) if _finite(v)]
        ax.errorbar([x[i] + dx for i in shown], [values[i] * 100 for i in shown],
                    yerr=[(errors[i] or 0) * 100 if _finite(errors[i]) else 0 for i in shown],
                    fmt="o", markersize=4, capsize=2, label=f"{task} {metric}")
    ax.set_ylabel("score (%), bars: standard error")
    ax.set_title("Downstream tasks (lm-eval)")
    ax.legend(fontsize=7, loc="best")
    ax2 = fig.add_subplot(1, 2, 2)
    ppl = [r["perplexity"] if _finite(r.get("perplexity")) else np.nan for r in rows]
    removals = [row_removal(r) for r in rows]
    ax2.bar(x, ppl, color=["black" if not removal else "#2e86c1" for removal in removals])
    ax2.set_yscale("log")
    finite = [v for v in ppl if math.isfinite(v)]
    if finite:
        _log_ticks(ax2.yaxis, min(finite), max(finite))
    ax2.set_ylabel("perplexity (log scale)")
    ax2.set_title("Perplexity")
    for a in (ax, ax2):
        a.set_xticks(x)
        a.set_xticklabels(labels, rotation=90 if len(rows) > ANNOTATE_MAX_BLOCKS else 0, fontsize=8)
        a.set_xlabel("removed blocks" if all(map(is_whole_blocks, removals)) else "removed units")
    fig.suptitle(f"{rows[0].get('model', '')}: downstream tasks and perplexity per configuration")
    return fig


# Figures of whole-block removals (removed_layers is their whole removal set): they get those rows only.
BLOCK_FIGURES: dict[str, Callable[[Sequence[dict]], Figure | None]] = {
    "per-block": per_block_figure,
    "tradeoff": tradeoff_figure,
    "pairs": pair_heatmap,
}
# Figures that name attention and MLP units as well: they get every row.
UNIT_FIGURES: dict[str, Callable[[Sequence[dict]], Figure | None]] = {
    "importance": importance_figure,
    "tasks": tasks_figure,
    "per-unit": per_unit_figure,
}


def figure_path(csv_path: str, kind: str) -> str:
    return f"{os.path.splitext(csv_path)[0]}_{kind}.png"


def build_figures(rows: Sequence[dict]) -> list[tuple[str, Figure]]:
    """Every figure the rows support, by kind, drawn but not written."""
    blocks_only = [r for r in rows if is_whole_blocks(row_removal(r))]
    figures = [(kind, build(blocks_only) if blocks_only else None) for kind, build in BLOCK_FIGURES.items()]
    figures += [(kind, build(rows) if rows else None) for kind, build in UNIT_FIGURES.items()]
    built = [(kind, fig) for kind, fig in figures if fig is not None]
    if not built:
        log.info("No figure applies to these rows (figures need single-block removals, several removal depths, "
                 "pairs of removed blocks, per-block scores or task columns)")
    return built


def save_figure(fig: Figure, path: str) -> None:
    """The figure as PNG at ``path``, replacing (not following) whatever is there (utils.files)."""
    replace_file(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
