"""Removal sets: which blocks a configuration removes, checked against a depth.

Plain data and no torch, so the planning modes (and `main.py --help`) can use
it without loading a model.
"""

from __future__ import annotations

from typing import Sequence

from utils.errors import KitError

# The indices of the blocks a configuration removes, sorted.
Removal = tuple[int, ...]


def validate_removal(remove: Sequence[int], n_blocks: int) -> Removal:
    """Check a removal set against the model's depth; return it sorted.

    Raises a KitError naming the problem and the valid range, because a typo in
    --remove should never silently evaluate a different model.
    """
    remove = list(remove)
    valid = f"valid block indices are 0..{n_blocks - 1}"
    for i in remove:
        if i < 0:
            raise KitError(f"block index {i} is negative; {valid}")
        if i >= n_blocks:
            raise KitError(f"block index {i} is out of range for a {n_blocks}-block model; {valid}")
    repeated = sorted({i for i in remove if remove.count(i) > 1})
    if repeated:
        raise KitError(f"block index {repeated[0]} is given more than once")
    if len(remove) >= n_blocks:
        raise KitError(f"cannot remove all {n_blocks} blocks; keep at least one")
    return tuple(sorted(remove))


def kept_blocks(n_blocks: int, remove: Sequence[int]) -> tuple[int, ...]:
    removed = set(remove)
    return tuple(i for i in range(n_blocks) if i not in removed)
