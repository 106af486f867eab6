"""Removal sets: which units a configuration removes, checked against a depth.

A unit is a whole block or one of its two sublayers. A removal set is a
sorted tuple of units in which a whole block is its index (an int, so every
whole-block set is the plain tuple of block indices it always was) and a
sublayer is its name, ``"attn4"`` (block 4's attention) or ``"mlp5"`` (block
5's MLP). Removing both sublayers of a block is removing the block: the
canonical form merges them, so every configuration has one spelling.

Plain data and no torch, so the planning modes (and `main.py --help`) can use
it without loading a model.
"""

from __future__ import annotations

import re
from typing import Sequence, Union

from utils.errors import KitError

# A whole block (its index) or a sublayer ("attn4", "mlp5").
Unit = Union[int, str]
# The units a configuration removes, in canonical order (models.units.canonical).
Removal = tuple[Unit, ...]

SUBLAYERS = ("attn", "mlp")
# --unit: which units the choosing and sweeping modes take as candidates.
UNIT_KINDS = ("block", "attn", "mlp", "sublayer")
# What a partly kept block still computes: a node of the shared-prefix engine is (block, part).
FULL = "block"

_NAME = re.compile(r"^(block|attn|mlp)(\d+)$")
_ORDER = {"block": 0, "attn": 1, "mlp": 2}


def parse_unit(text: str) -> Unit:
    """'3' or 'block3' -> 3, 'attn4' -> 'attn4', 'mlp5' -> 'mlp5'; a KitError for anything else."""
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    match = _NAME.match(text)
    if not match:
        raise KitError(f"'{text}' is not a unit: give a block index (3), or attnN / mlpN for a block's "
                       "attention or MLP (attn3, mlp3)")
    kind, index = match.group(1), int(match.group(2))
    return index if kind == "block" else f"{kind}{index}"


def unit_parts(unit: Unit) -> tuple[int, str]:
    """(block index, 'block' | 'attn' | 'mlp')."""
    if isinstance(unit, int):
        return unit, "block"
    match = _NAME.match(unit)
    if not match:
        raise KitError(f"'{unit}' is not a unit")
    return int(match.group(2)), match.group(1)


def unit_name(unit: Unit) -> str:
    """The unit as the removed_units column spells it: 'block2', 'attn4', 'mlp5'."""
    index, kind = unit_parts(unit)
    return f"{kind}{index}"


def unit_names(removal: Sequence[Unit]) -> list[str]:
    return [unit_name(u) for u in removal]


def canonical(units: Sequence[Unit]) -> Removal:
    """Sorted by block, then block < attn < mlp; attn i with mlp i becomes block i."""
    parts = [unit_parts(u) for u in units]
    both = {i for i, kind in parts if kind == "attn"} & {i for i, kind in parts if kind == "mlp"}
    merged = {(i, "block") if i in both else (i, kind) for i, kind in parts}
    return tuple(i if kind == "block" else f"{kind}{i}" for i, kind in sorted(merged, key=lambda p: (p[0], _ORDER[p[1]])))


def sublayers_in(removal: Sequence[Unit]) -> int:
    """How many sublayers a set removes: a whole block counts its attention and its MLP."""
    return sum(2 if isinstance(u, int) else 1 for u in removal)


def is_whole_blocks(removal: Sequence[Unit]) -> bool:
    return all(isinstance(u, int) for u in removal)


def removed_whole(removal: Sequence[Unit]) -> tuple[int, ...]:
    """The blocks a set removes whole (what the removed_layers column lists)."""
    return tuple(sorted(u for u in removal if isinstance(u, int)))


def removed_sublayers(removal: Sequence[Unit]) -> dict[int, str]:
    """Block index -> the one sublayer removed from it ('attn' or 'mlp'), for partly kept blocks."""
    return {i: kind for i, kind in map(unit_parts, removal) if kind != "block"}


def validate_removal(remove: Sequence[Unit], n_blocks: int) -> Removal:
    """Check a removal set against the model's depth; return it canonical.

    Raises a KitError naming the problem and the valid range, because a typo in
    --remove should never silently evaluate a different model. A set must
    keep at least one attention: the KV cache counts the tokens seen from the
    first attention that is kept.
    """
    remove = list(remove)
    valid = f"valid block indices are 0..{n_blocks - 1}"
    parts = [unit_parts(u) for u in remove]
    for i, kind in parts:
        unit = str(i) if kind == "block" else f"{kind}{i}"
        if i < 0:
            raise KitError(f"block index {i} is negative; {valid}")
        if i >= n_blocks:
            what = "block index" if kind == "block" else "unit"
            raise KitError(f"{what} {unit} is out of range for a {n_blocks}-block model; {valid}")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        i, kind = repeated[0]
        raise KitError(f"block index {i} is given more than once" if kind == "block"
                       else f"unit {kind}{i} is given more than once")
    whole = {i for i, kind in parts if kind == "block"}
    inside = [f"{kind}{i}" for i, kind in parts if kind != "block" and i in whole]
    if inside:
        raise KitError(f"unit {inside[0]} is part of block {unit_parts(inside[0])[0]}, which is removed whole")
    removal = canonical(remove)
    if len(removed_whole(removal)) >= n_blocks:
        raise KitError(f"cannot remove all {n_blocks} blocks; keep at least one")
    attention_gone = set(removed_whole(removal)) | {i for i, k in removed_sublayers(removal).items() if k == "attn"}
    if len(attention_gone) >= n_blocks:
        raise KitError("this removes every attention; keep at least one (the KV cache counts the tokens seen "
                       "from the first kept attention)")
    return removal


def kept_blocks(n_blocks: int, remove: Sequence[Unit]) -> tuple[int, ...]:
    """The blocks that stay in the block list (whole or in part)."""
    removed = set(removed_whole(remove))
    return tuple(i for i in range(n_blocks) if i not in removed)


def kept_nodes(n_blocks: int, remove: Sequence[Unit]) -> tuple[tuple[int, str], ...]:
    """(block, what of it runs) for each kept block: 'block' (all of it), 'attn' or 'mlp' (that sublayer only)."""
    dropped = removed_sublayers(remove)
    other = {"attn": "mlp", "mlp": "attn"}
    return tuple((i, other[dropped[i]] if i in dropped else FULL) for i in kept_blocks(n_blocks, remove))


def unit_order(removal: Sequence[Unit]) -> tuple:
    """Sort key of a removal set, unit by unit (block i < attn i < mlp i < block i+1); on whole-block
    sets the order of the plain tuples."""
    return tuple((i, _ORDER[kind]) for i, kind in map(unit_parts, removal))


def removal_order(removal: Sequence[Unit]) -> tuple:
    """Sort key for removal sets: by size, then unit by unit."""
    return len(removal), unit_order(removal)


def row_removal(row: dict) -> Removal:
    """The removal set of a results row: its removed_units, or (files written before that column, whole
    blocks only) its removed_layers."""
    units = row.get("removed_units")
    if units:
        return canonical([parse_unit(str(u)) for u in units])
    return tuple(sorted(int(i) for i in row["removed_layers"]))


def candidate_units(kind: str, n_blocks: int) -> list[Unit]:
    """The units --unit KIND offers: blocks, attentions, MLPs, or both sublayers of every block."""
    if kind == "block":
        return list(range(n_blocks))
    kinds = SUBLAYERS if kind == "sublayer" else (kind,)
    return [f"{k}{i}" for i in range(n_blocks) for k in kinds]


def extended(removal: Sequence[Unit], unit: Unit) -> Removal | None:
    """``removal`` with ``unit`` added, canonical; None when the unit is already removed."""
    index, kind = unit_parts(unit)
    if index in removed_whole(removal) or unit in removal:
        return None
    return canonical([*removal, unit])
