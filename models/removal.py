"""Remove transformer blocks from a loaded model without copying it.

Deleting entries from the block list is not enough with transformers 5.x:
every attention module keeps the index it was built with and the KV cache is
indexed by it, and the config still announces the old depth (the cache is
sized from it). ``removed_blocks`` therefore swaps in a list of the kept
blocks, renumbers them and updates the config, and undoes all of it on exit,
so one loaded model serves every configuration of a sweep.

Where the blocks live and which config fields describe them is the family
entry's knowledge (models.families). Each kept block keeps its own attention
kind; the config is rewritten so that a saved and reloaded model rebuilds
exactly the kept blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn

from models.families import DEPTH_FIELDS, Family, block_owner, check_prunable, family_of
from models.units import kept_blocks, validate_removal

def context_size(model: nn.Module) -> int:
    """The longest input the model's position embeddings allow."""
    return getattr(model.config, "n_positions", None) or model.config.max_position_embeddings


def _set_layer_index(block: nn.Module, index: int, family: Family) -> None:
    for module in block.modules():
        for attr in family.index_attrs:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, index)


def _depth_state(config, family: Family) -> dict:
    """The config fields that removal rewrites, as they were before it."""
    state = {f: getattr(config, f) for f in DEPTH_FIELDS if hasattr(config, f)}
    for name in family.per_layer_fields:
        if getattr(config, name, None) is not None:
            state[name] = list(getattr(config, name))
    for name in family.saved:
        if getattr(config, name, None) is not None:
            state[name] = getattr(config, name)
    return state


def _set_depth(config, keep: Sequence[int], state: dict, family: Family) -> None:
    for name in DEPTH_FIELDS:
        if name in state:
            setattr(config, name, len(keep))
    for name in family.per_layer_fields:
        if name in state:
            setattr(config, name, [state[name][i] for i in keep])
    if family.rewrite:
        family.rewrite(config, keep, state)


@contextmanager
def removed_blocks(model: nn.Module, remove: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily turn ``model`` into its pruned version, in place.

    Inside the block the model is a normal model of the reduced depth: forward
    with and without cache, generate() and save_pretrained() all work, and the
    kept blocks are the original modules (shared weights, no copy). On exit the
    original blocks, layer indices and config are restored.
    """
    family = family_of(model)
    parent, name = block_owner(model)
    blocks = getattr(parent, name)
    remove = validate_removal(remove, len(blocks))
    if remove:
        check_prunable(model)
    keep = kept_blocks(len(blocks), remove)
    state = _depth_state(model.config, family)
    try:
        setattr(parent, name, nn.ModuleList([blocks[i] for i in keep]))
        for new_index, old_index in enumerate(keep):
            _set_layer_index(blocks[old_index], new_index, family)
        _set_depth(model.config, keep, state, family)
        yield model
    finally:
        setattr(parent, name, blocks)
        for index, block in enumerate(blocks):
            _set_layer_index(block, index, family)
        for key, value in state.items():
            setattr(model.config, key, value)
