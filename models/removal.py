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

import copy
from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from models.families import DEPTH_FIELDS, Family, block_owner, check_prunable, family_of, get_blocks, module_at
from models.units import Removal, Unit, kept_blocks, removed_sublayers, removed_whole, unit_names, validate_removal
from utils.errors import KitError

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


class SkippedAttention(nn.Module):
    """Stands in for a removed attention: adds nothing to the residual stream and computes nothing.

    It returns zeros shaped like its input, in the (output, weights) pair every
    supported attention returns, and writes no KV-cache entry; h + 0 is h
    exactly, so the block computes what it would without its attention.
    """

    def forward(self, hidden_states: torch.Tensor | None = None, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stands in for a removed MLP (or its last module): zeros of the residual width, nothing computed."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.width)


class Nothing(nn.Module):
    """Stands in for an inner module of an inline MLP (OPT's fc1): an empty feature axis, so the activation
    between it and the last module costs nothing."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., :0]


def _stubs(model: nn.Module, family: Family, sublayer: str) -> dict[str, nn.Module]:
    """Attribute path within a block -> the module that replaces it when ``sublayer`` is removed."""
    if sublayer == "attn":
        return {family.attention: SkippedAttention()}
    *inner, last = family.mlp
    return {**{path: Nothing() for path in inner}, last: SkippedMLP(model.config.hidden_size)}


def _swap(block: nn.Module, path: str, module: nn.Module) -> nn.Module:
    *parents, name = path.split(".")
    owner = module_at(block, ".".join(parents)) if parents else block
    old = getattr(owner, name)
    setattr(owner, name, module)
    return old


@contextmanager
def skipped_sublayer(model: nn.Module, block: nn.Module, sublayer: str) -> Iterator[nn.Module]:
    """``block`` with its attention or MLP (``sublayer``: 'attn' or 'mlp') replaced by a stub, then restored."""
    family = family_of(model)
    originals = {path: _swap(block, path, stub) for path, stub in _stubs(model, family, sublayer).items()}
    try:
        yield block
    finally:
        for path, module in originals.items():
            _swap(block, path, module)


def _real_attentions(n_blocks: int, remove: Sequence[Unit]) -> list[int]:
    """Original indices of the blocks whose attention still runs, in order."""
    skipped = removed_sublayers(remove)
    return [i for i in kept_blocks(n_blocks, remove) if skipped.get(i) != "attn"]


def check_units(model: nn.Module, remove: Sequence[Unit]) -> Removal:
    """Refuse, before any work, a set of units this model cannot lose; return it canonical.

    A skipped attention writes no KV-cache entry, so the real attentions are
    renumbered onto cache layers 0, 1, ... (see removed_units); each cache
    layer takes its kind (full or sliding window) from the config's per-block
    list, so a set that would put a real attention on a cache layer of another
    kind (a Qwen2 model mixing both) is refused.
    """
    n_blocks = len(getattr(*block_owner(model)))
    remove = validate_removal(remove, n_blocks)
    if remove:
        check_prunable(model)
    types = getattr(model.config, "layer_types", None)
    if types is not None and removed_sublayers(remove):
        real = _real_attentions(n_blocks, remove)
        kept = [types[i] for i in kept_blocks(n_blocks, remove)]
        if [types[i] for i in real] != kept[: len(real)]:
            raise KitError(f"removing {', '.join(unit_names(remove))} would put kept attentions on KV-cache "
                           "layers of another attention kind (full vs sliding window) in this model; "
                           "choose other units")
    return remove


@contextmanager
def removed_units(model: nn.Module, remove: Sequence[Unit]) -> Iterator[nn.Module]:
    """Temporarily turn ``model`` into its pruned version for a set of units, in place.

    Whole blocks go as in ``removed_blocks``; a removed attention or MLP of a
    kept block is replaced by a stub that computes nothing (SkippedAttention,
    SkippedMLP), so the speed test really skips the work. The pruned model
    runs forward with and without cache and generate(); on exit every module,
    index and config field is as before. A whole-block set is exactly
    ``removed_blocks``.
    """
    family = family_of(model)
    parent, name = block_owner(model)
    n_blocks = len(getattr(parent, name))
    remove = check_units(model, remove)
    with removed_blocks(model, removed_whole(remove)) as pruned, ExitStack() as stack:
        skipped = removed_sublayers(remove)
        if skipped:
            blocks = getattr(parent, name)
            at = {old: new for new, old in enumerate(kept_blocks(n_blocks, remove))}
            for index, sublayer in skipped.items():
                stack.enter_context(skipped_sublayer(model, blocks[at[index]], sublayer))
            # KV-cache layer 0 must be the first real attention: transformers counts the tokens seen from it
            for cache_index, index in enumerate(_real_attentions(n_blocks, remove)):
                _set_layer_index(blocks[at[index]], cache_index, family)
        yield pruned


@torch.no_grad()
def zeroed_copy(model: nn.Module, remove: Sequence[Unit]) -> nn.Module:
    """A copy of the pruned model that plain transformers loads: whole blocks removed, and each removed
    sublayer kept with its output projection (weight and bias) zeroed.

    It adds exactly zero to the residual stream, as the skipped sublayer does
    (h + 0 is h), so the logits are those of ``removed_units``; but the
    checkpoint keeps the sublayer's weights and plain transformers still
    computes it (and caches its keys and values): full size, no speed gain.
    """
    remove = check_units(model, remove)
    with removed_blocks(model, removed_whole(remove)) as pruned:
        out = copy.deepcopy(pruned)
    for proj in zeroed_projections(out, remove, len(getattr(*block_owner(model)))):
        proj.weight.zero_()
        if getattr(proj, "bias", None) is not None:
            proj.bias.zero_()
    return out


def zeroed_projections(pruned: nn.Module, remove: Removal, n_blocks: int) -> list[nn.Module]:
    """The output projections of the removed sublayers in a zeroed copy (``pruned``, of a model of
    ``n_blocks`` blocks): the modules that must stay zero, and so untrained, when the copy is healed."""
    family, blocks = family_of(pruned), get_blocks(pruned)
    at = {old: new for new, old in enumerate(kept_blocks(n_blocks, remove))}
    return [module_at(blocks[at[index]], family.attention_out if sublayer == "attn" else family.mlp_out)
            for index, sublayer in removed_sublayers(remove).items()]


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
