"""Remove transformer blocks from a loaded model without copying it.

Deleting entries from the block list is not enough with transformers 5.x:
every attention module keeps the ``layer_idx`` it was built with and the KV
cache is indexed by it, and the config still announces the old depth (the
cache is sized from it). ``removed_blocks`` therefore swaps in a list of the
kept blocks, renumbers them and updates the config, and undoes all of it on
exit, so one loaded model serves every configuration of a sweep.

Decoder families differ in where the block list lives (BLOCK_PATHS), what the
index attribute is called (GPT-Neo says ``layer_id``), which config field
states the depth, and which config fields describe each layer (``layer_types``
for sliding-window models, GPT-Neo's ``attention_types``/``attention_layers``,
Qwen2's ``max_window_layers``). Each kept block keeps its own attention kind;
the config is rewritten so that a saved and reloaded model rebuilds exactly
the kept blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn

from utils.errors import KitError

# The indices of the blocks a configuration removes, sorted.
Removal = tuple[int, ...]

# Where each supported architecture keeps its list of blocks (model_type ->
# dotted attribute path from the *ForCausalLM model).
BLOCK_PATHS: dict[str, str] = {
    "gpt2": "transformer.h",
    "gpt_neo": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
}

# Config fields that state the depth; those a config has are kept in step.
DEPTH_FIELDS = ("n_layer", "num_hidden_layers", "num_layers")
# Config lists with one entry per block: pruning keeps the entries of kept blocks.
PER_LAYER_FIELDS = ("layer_types", "attention_layers")
# Attributes through which a block's modules know their own position (the
# index into the KV cache): GPT-Neo calls it layer_id, the others layer_idx.
INDEX_ATTRS = ("layer_idx", "layer_id")


def block_path(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in BLOCK_PATHS:
        supported = ", ".join(sorted(BLOCK_PATHS))
        raise KitError(f"model type '{model_type}' is not supported (supported: {supported})")
    if getattr(model.config, "is_heterogeneous", False):
        raise KitError(f"this {model_type} model has a per-layer config (per_layer_config), which block removal "
                       "does not renumber; it is not supported")
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
        for attr in INDEX_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, index)


def _depth_state(config) -> dict:
    """The config fields that removal rewrites, as they were before it."""
    state = {f: getattr(config, f) for f in DEPTH_FIELDS if hasattr(config, f)}
    for field in PER_LAYER_FIELDS:
        if getattr(config, field, None) is not None:
            state[field] = list(getattr(config, field))
    if getattr(config, "attention_types", None) is not None:
        state["attention_types"] = config.attention_types
    if isinstance(getattr(config, "max_window_layers", None), int):
        state["max_window_layers"] = config.max_window_layers
    return state


def _run_lengths(kinds: Sequence[str]) -> list[list]:
    """GPT-Neo's attention_types for a list of per-block kinds: [[[kind], repeats], ...]."""
    runs: list[list] = []
    for kind in kinds:
        if runs and runs[-1][0] == [kind]:
            runs[-1][1] += 1
        else:
            runs.append([[kind], 1])
    return runs


def _set_depth(config, keep: Sequence[int], state: dict) -> None:
    for field in DEPTH_FIELDS:
        if field in state:
            setattr(config, field, len(keep))
    for field in PER_LAYER_FIELDS:
        if field in state:
            setattr(config, field, [state[field][i] for i in keep])
    if "attention_types" in state:
        # GPT-Neo rebuilds attention_layers from attention_types when it loads.
        config.attention_types = _run_lengths(config.attention_layers)
    if "max_window_layers" in state:
        # Qwen2: blocks below this index use full attention, the rest a sliding window.
        config.max_window_layers = sum(1 for i in keep if i < state["max_window_layers"])


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
    keep = list(kept_blocks(len(blocks), remove))
    parent, name = _parent_and_name(model)
    state = _depth_state(model.config)
    try:
        setattr(parent, name, nn.ModuleList([blocks[i] for i in keep]))
        for new_index, old_index in enumerate(keep):
            _set_layer_index(blocks[old_index], new_index)
        _set_depth(model.config, keep, state)
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


def context_size(model: nn.Module) -> int:
    """The longest input the model's position embeddings allow."""
    return getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
