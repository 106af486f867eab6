"""Units and removal sets: which parts of the model a configuration removes, checked against a depth.

A unit is a whole block or one of its two sublayers, a small value (``Unit``)
with one text form: ``"3"`` or ``"block3"`` for block 3, ``"attn4"`` for
block 4's attention, ``"mlp5"`` for block 5's MLP. A removal set is a sorted
tuple of units. Removing both sublayers of a block is removing the block: the
canonical form merges them, so every configuration has one spelling.

A whole-block unit compares and hashes equal to its index, and a sublayer to
its name, so a set of whole blocks still equals the plain tuple of block
indices that results files and scripts use: ``canonical([1, 3]) == (1, 3)``.

Plain data and no torch, so the planning modes (and `main.py --help`) can use
it without loading a model.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence, Union

from utils.errors import KitError

BLOCK = "block"
SUBLAYERS = ("attn", "mlp")
PARTS = (BLOCK, *SUBLAYERS)  # the order of units within one block
# --unit: which units the choosing and sweeping modes take as candidates.
UNIT_KINDS = ("block", "attn", "mlp", "sublayer")
# What a partly kept block still computes: a node of the shared-prefix engine is (block, part).
FULL = BLOCK


class Unit:
    """A whole block (``part`` 'block') or one of its sublayers ('attn', 'mlp')."""

    __slots__ = ("block", "part")

    def __init__(self, block: int, part: str = BLOCK):
        if part not in PARTS:
            raise KitError(f"'{part}' is not a part of a block (one of {', '.join(PARTS)})")
        object.__setattr__(self, "block", int(block))
        object.__setattr__(self, "part", part)

    def __setattr__(self, name, value):
        raise AttributeError("a Unit is immutable")

    def __reduce__(self):  # pickled (between processes) and copied as its constructor call
        return Unit, (self.block, self.part)

    @classmethod
    def of(cls, value: "UnitLike") -> "Unit":
        """A Unit from itself, a block index, or its text ('3', 'block3', 'attn4', 'mlp5')."""
        if isinstance(value, Unit):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        if isinstance(value, str):
            return cls.parse(value)
        raise KitError(f"{value!r} is not a unit")

    @classmethod
    def parse(cls, text: str) -> "Unit":
        """'3' or 'block3' -> block 3, 'attn4', 'mlp5'; a KitError for anything else."""
        text = text.strip()
        digits = text.lstrip("-")
        if digits.isdigit() and digits.isascii():
            return cls(int(text))
        part = next((p for p in PARTS if text.startswith(p)), None)
        index = text[len(part):] if part else ""
        if not (index.isdigit() and index.isascii()):
            raise KitError(f"'{text}' is not a unit: give a block index (3), or attnN / mlpN for a block's "
                           "attention or MLP (attn3, mlp3)")
        return cls(int(index), part)

    @property
    def whole(self) -> bool:
        return self.part == BLOCK

    @property
    def name(self) -> str:
        """The removed_units column's spelling: 'block2', 'attn4', 'mlp5'."""
        return f"{self.part}{self.block}"

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: by block, then block < attn < mlp."""
        return self.block, PARTS.index(self.part)

    def __str__(self) -> str:  # how tables label it: '2', 'attn4'
        return str(self.block) if self.whole else self.name

    def __repr__(self) -> str:
        return str(self.block) if self.whole else repr(self.name)

    def __eq__(self, other) -> bool:
        if isinstance(other, Unit):
            return self.order == other.order
        if isinstance(other, int) and not isinstance(other, bool):
            return self.whole and self.block == other
        if isinstance(other, str):
            return not self.whole and self.name == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.block) if self.whole else hash(self.name)

    def __lt__(self, other: "Unit") -> bool:
        return self.order < Unit.of(other).order


# What callers may give where a unit is expected: a Unit, a block index, or a unit's text.
UnitLike = Union[Unit, int, str]
# The units a configuration removes, in canonical order (canonical).
Removal = tuple[Unit, ...]


def parse_unit(text: str) -> Unit:
    return Unit.parse(text)


def unit_names(removal: Iterable[UnitLike]) -> list[str]:
    return [Unit.of(u).name for u in removal]


def canonical(units: Iterable[UnitLike]) -> Removal:
    """Sorted by block, then block < attn < mlp; attn i with mlp i becomes block i."""
    parts = {Unit.of(u) for u in units}
    both = {u.block for u in parts if u.part == "attn"} & {u.block for u in parts if u.part == "mlp"}
    merged = {Unit(u.block) if u.block in both else u for u in parts}
    return tuple(sorted(merged, key=lambda u: u.order))


def sublayers_in(removal: Iterable[UnitLike]) -> int:
    """How many sublayers a set removes: a whole block counts its attention and its MLP."""
    return sum(2 if Unit.of(u).whole else 1 for u in removal)


def is_whole_blocks(removal: Iterable[UnitLike]) -> bool:
    return all(Unit.of(u).whole for u in removal)


def removed_whole(removal: Iterable[UnitLike]) -> tuple[int, ...]:
    """The blocks a set removes whole (what the removed_layers column lists)."""
    return tuple(sorted(u.block for u in map(Unit.of, removal) if u.whole))


def removed_sublayers(removal: Iterable[UnitLike]) -> dict[int, str]:
    """Block index -> the one sublayer removed from it ('attn' or 'mlp'), for partly kept blocks."""
    return {u.block: u.part for u in map(Unit.of, removal) if not u.whole}


def validate_removal(remove: Iterable[UnitLike], n_blocks: int) -> Removal:
    """Check a removal set against the model's depth; return it canonical.

    Raises a KitError naming the problem and the valid range, because a typo in
    --remove should never silently evaluate a different model. A set must
    keep at least one attention: the KV cache counts the tokens seen from the
    first attention that is kept.
    """
    units = [Unit.of(u) for u in remove]
    valid = f"valid block indices are 0..{n_blocks - 1}"
    for u in units:
        if u.block < 0:
            raise KitError(f"block index {u.block} is negative; {valid}")
        if u.block >= n_blocks:
            what = "block index" if u.whole else "unit"
            raise KitError(f"{what} {u} is out of range for a {n_blocks}-block model; {valid}")
    repeated = sorted({u for u in units if units.count(u) > 1}, key=lambda u: u.order)
    if repeated:
        u = repeated[0]
        raise KitError(f"block index {u.block} is given more than once" if u.whole
                       else f"unit {u.name} is given more than once")
    whole = {u.block for u in units if u.whole}
    inside = [u for u in units if not u.whole and u.block in whole]
    if inside:
        raise KitError(f"unit {inside[0].name} is part of block {inside[0].block}, which is removed whole")
    removal = canonical(units)
    if len(removed_whole(removal)) >= n_blocks:
        raise KitError(f"cannot remove all {n_blocks} blocks; keep at least one")
    attention_gone = set(removed_whole(removal)) | {i for i, k in removed_sublayers(removal).items() if k == "attn"}
    if len(attention_gone) >= n_blocks:
        raise KitError("this removes every attention; keep at least one (the KV cache counts the tokens seen "
                       "from the first kept attention)")
    return removal


def is_valid(removal: Iterable[UnitLike], n_blocks: int) -> bool:
    """Whether ``removal`` keeps a block and an attention of an n-block model."""
    try:
        validate_removal(removal, n_blocks)
    except KitError:
        return False
    return True


def kept_blocks(n_blocks: int, remove: Iterable[UnitLike]) -> tuple[int, ...]:
    """The blocks that stay in the block list (whole or in part)."""
    removed = set(removed_whole(remove))
    return tuple(i for i in range(n_blocks) if i not in removed)


def kept_nodes(n_blocks: int, remove: Iterable[UnitLike]) -> tuple[tuple[int, str], ...]:
    """(block, what of it runs) for each kept block: 'block' (all of it), 'attn' or 'mlp' (that sublayer only)."""
    remove = list(remove)
    dropped = removed_sublayers(remove)
    other = {"attn": "mlp", "mlp": "attn"}
    return tuple((i, other[dropped[i]] if i in dropped else FULL) for i in kept_blocks(n_blocks, remove))


def unit_order(removal: Iterable[UnitLike]) -> tuple:
    """Sort key of a removal set, unit by unit (block i < attn i < mlp i < block i+1); on whole-block
    sets the order of the plain tuples."""
    return tuple(Unit.of(u).order for u in removal)


def removal_order(removal: Sequence[UnitLike]) -> tuple:
    """Sort key for removal sets: by size, then unit by unit."""
    return len(removal), unit_order(removal)


def row_removal(row: dict) -> Removal:
    """The removal set of a results row: its removed_units, or (files written before that column, whole
    blocks only) its removed_layers."""
    units = row.get("removed_units")
    if units:
        return canonical(str(u) for u in units)
    return canonical(int(i) for i in row["removed_layers"])


def candidate_units(kind: str, n_blocks: int) -> list[Unit]:
    """The units --unit KIND offers: blocks, attentions, MLPs, or both sublayers of every block."""
    if kind == "block":
        return [Unit(i) for i in range(n_blocks)]
    kinds = SUBLAYERS if kind == "sublayer" else (kind,)
    return [Unit(i, k) for i in range(n_blocks) for k in kinds]


def extended(removal: Iterable[UnitLike], unit: UnitLike) -> Removal | None:
    """``removal`` with ``unit`` added, canonical; None when the unit is already removed."""
    removal, unit = tuple(map(Unit.of, removal)), Unit.of(unit)
    if unit.block in removed_whole(removal) or unit in removal:
        return None
    return canonical([*removal, unit])


def removal_key(removal: Iterable[UnitLike]) -> str:
    """A removal set as JSON text, the key rows are matched by: whole blocks as the sorted list the
    removed_layers column stores ("[1, 3]"); a set with sublayers (canonical order) as its unit names
    ("[\"block1\", \"attn3\"]")."""
    units = canonical(removal)
    if is_whole_blocks(units):
        return json.dumps([u.block for u in units])
    return json.dumps(unit_names(units))


def config_key(removal: Iterable[UnitLike], patch: str | None = None) -> str:
    """The key of a row's configuration: its removal_key, and the --patch method when one was applied
    (a patched set is another model than the same set plain); no method, '' and 'none' are plain."""
    key = removal_key(removal)
    return key if patch in (None, "", "none") else f"{key} patch={patch}"


def removed_label(removal: Iterable[UnitLike]) -> str:
    """'1, 3' for blocks; sublayers by name: '1, attn3'."""
    units = [Unit.of(u) for u in removal]
    return ", ".join(map(str, units)) if units else "None"


def compact_label(removal: Iterable[UnitLike]) -> str:
    """Removed blocks with consecutive runs as ranges, then sublayers: [0, 1, 2, 5, 'mlp7'] -> '0-2,5,mlp7'."""
    units = [Unit.of(u) for u in removal]
    if not units:
        return "None"
    runs: list[list[int]] = []
    for i in sorted(u.block for u in units if u.whole):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join([*(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs),
                     *(u.name for u in units if not u.whole)])
