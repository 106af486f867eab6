"""Remove transformer blocks from a loaded model without copying it.

Deleting entries from the block list is not enough with transformers 5.x:
every attention module keeps the ``layer_idx`` it was built with and the KV
cache is indexed by it, and the config still announces the old depth (the
cache is sized from it). ``removed_blocks`` therefore swaps in a list of the
kept blocks, renumbers them and updates the config, and undoes all of it on
exit, so one loaded model serves every configuration of a sweep.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from utils.errors import KitError

# Where each supported architecture keeps its list of blocks (model_type ->
# dotted attribute path from the *ForCausalLM model).
BLOCK_PATHS: dict[str, str] = {
    "gpt2": "transformer.h",
}

# Config fields that state the depth; those a config has are kept in step.
DEPTH_FIELDS = ("n_layer", "num_hidden_layers", "num_layers")


def block_path(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in BLOCK_PATHS:
        supported = ", ".join(sorted(BLOCK_PATHS))
        raise KitError(f"model type '{model_type}' is not supported (supported: {supported})")
    return BLOCK_PATHS[model_type]


def _parent_and_name(model: nn.Module) -> tuple[nn.Module, str]:
    *parents, name = block_path(model).split(".")
    parent = model
    for attr in parents:
        parent = getattr(parent, attr)
    return parent, name


def get_blocks(model: nn.Module) -> nn.ModuleList:
    parent, name = _parent_and_name(model)
    return getattr(parent, name)


def num_blocks(model: nn.Module) -> int:
    return len(get_blocks(model))


def validate_removal(remove: Sequence[int], n_blocks: int) -> tuple[int, ...]:
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


def _set_layer_index(block: nn.Module, index: int) -> None:
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def _depth_state(config) -> dict:
    state = {f: getattr(config, f) for f in DEPTH_FIELDS if hasattr(config, f)}
    if getattr(config, "layer_types", None) is not None:
        state["layer_types"] = list(config.layer_types)
    return state


def _set_depth(config, keep: Sequence[int], state: dict) -> None:
    for field in DEPTH_FIELDS:
        if field in state:
            setattr(config, field, len(keep))
    if "layer_types" in state:
        config.layer_types = [state["layer_types"][i] for i in keep]


def _check_index_free(model: nn.Module, remove: Sequence[int]) -> None:
    # GPT-2 can scale attention by 1/(layer index + 1), fixed when the block is
    # built: a renumbered block would compute something else after a reload.
    if remove and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise KitError(
            "this model scales attention by its layer index (scale_attn_by_inverse_layer_idx), "
            "so removing blocks would change the kept blocks; it is not supported"
        )


@contextmanager
def removed_blocks(model: nn.Module, remove: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily turn ``model`` into its pruned version, in place.

    Inside the block the model is a normal model of the reduced depth: forward
    with and without cache, generate() and save_pretrained() all work, and the
    kept blocks are the original modules (shared weights, no copy). On exit the
    original blocks, layer indices and config are restored.
    """
    blocks = get_blocks(model)
    remove = validate_removal(remove, len(blocks))
    _check_index_free(model, remove)
    keep = [i for i in range(len(blocks)) if i not in remove]
    parent, name = _parent_and_name(model)
    state = _depth_state(model.config)
    setattr(parent, name, nn.ModuleList([blocks[i] for i in keep]))
    for new_index, old_index in enumerate(keep):
        _set_layer_index(blocks[old_index], new_index)
    _set_depth(model.config, keep, state)
    try:
        yield model
    finally:
        setattr(parent, name, blocks)
        for index, block in enumerate(blocks):
            _set_layer_index(block, index)
        for field, value in state.items():
            setattr(model.config, field, value)


def kept_blocks(n_blocks: int, remove: Sequence[int]) -> tuple[int, ...]:
    removed = set(remove)
    return tuple(i for i in range(n_blocks) if i not in removed)
