"""Merging fitted linear maps into a model's own weights: a removed run of
blocks compensated without a new module (the fitting is pruning.compensation).

A maximal run of removed blocks a..b is replaced by a d x d map T acting on
the MLP output M of block a-1, the last kept block before the run (ReplaceMe,
Shopkhoev et al., 2025): the stream leaving block a-1 becomes h_mid + M T
instead of h_mid + M, h_mid being the stream after its attention. M is the
output of a linear projection (the family's ``mlp_out``), so
M T = x (W T) + b T and T is merged into that projection's weight and bias:
the model keeps its architecture and its parameter count.

A run starting at block 0 has no block before it. The map then acts on the
whole stream entering block 0, which in every supported family is a sum of
embedding lookups (token and, for GPT-2, GPT-Neo and OPT, learned position
embeddings; OPT's project_in where it has one): (E[ids] + P[pos]) T =
(E T)[ids] + (P T)[pos], so T is merged into each of them exactly. Where the
token embeddings are also the LM head (tied, as in GPT-2 and SmolLM2), the
patched model unties them: the LM head keeps the original matrix and the
embedding gets its own, which adds vocabulary x width parameters (counted in
the row's params) and writes ``tie_word_embeddings: false`` into an exported
config. The fit checks the merged embeddings against X T on calibration
tokens and refuses where they differ.

A scale (``--patch magnitude``, Prune&Comp) is merged differently: the
contributions every kept block after a run adds to the stream are multiplied
by one factor c, which is c times the weight and bias of its attention and
MLP output projections, or, where a norm follows them before the residual add
(Gemma), the weight of that norm (``scaled_contributions``).

Refused, with one line: removal sets with attention or MLP sublayers; OPT
with the layer norm after the residual add (do_layer_norm_before false),
where the MLP output is not added to the stream as it is; and a map into a
family that normalizes the MLP output before the add (Gemma 2 and 3), where
the merged map would pass through that norm and compute something else than
what was fitted.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from models.families import family_of, get_blocks, module_at
from models.units import is_whole_blocks, removed_whole, unit_names
from utils.errors import KitError

def removed_runs(removal: Sequence) -> list[tuple[int, int]]:
    """The maximal runs of consecutive removed blocks, (first, last), in order."""
    runs: list[list[int]] = []
    for i in sorted(removed_whole(removal)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def check_patchable(model: nn.Module, removal: Sequence, maps: bool = True) -> list[tuple[int, int]]:
    """Refuse a removal set or model that no map (``maps``; else no scale) can compensate exactly; its runs
    otherwise."""
    if not is_whole_blocks(removal):
        parts = ", ".join(u for u in unit_names(removal) if not u.startswith("block"))
        raise KitError(f"--patch compensates removed whole blocks; this configuration removes sublayers ({parts}): "
                       "use --patch none, or remove whole blocks")
    family = family_of(model)
    if family.model_type == "opt" and getattr(model.config, "do_layer_norm_before", True) is False:
        raise KitError("--patch cannot merge a map into this OPT model: its layer norm follows the residual add "
                       "(do_layer_norm_before false), so the MLP output is not added to the stream as it is")
    if maps and family.mlp_norm:
        raise KitError(f"--patch lstsq and cosine merge a map into the MLP output projection, and this "
                       f"{family.model_type} model normalizes that output ({family.mlp_norm}) before adding it, so "
                       "the merged map would not compute what was fitted: use --patch magnitude, or none")
    return removed_runs(removal)


def input_embeddings(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each module summed into the stream entering block 0."""
    found = []
    for alternatives in family_of(model).embeddings:
        path = next((p for p in alternatives if module_at(model, p) is not None), None)
        if path is None:
            raise KitError(f"--patch cannot find {' or '.join(alternatives)} in this model")
        found.append((path, module_at(model, path)))
    return found


@dataclass(frozen=True)
class Map:
    """A fitted map for the removed blocks first..last, and what its fit cost."""

    first: int
    last: int
    matrix: torch.Tensor | None  # (d, d) float64: the stream leaving the last kept point times this; None: a scale
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Replacement:
    """A parameter of the model and the tensor that stands in for it while the patch is applied: ``value``,
    or, for a scale, the parameter's own values (plus ``offset``) times ``factor`` (minus ``offset``), made
    when the patch is applied, so that a patch scaling every later block holds no copy of their weights."""

    module: nn.Module
    name: str  # "weight" or "bias"
    value: torch.Tensor | None = None
    factor: float | None = None
    offset: float = 0.0

    def tensor(self) -> torch.Tensor:
        if self.value is not None:
            return self.value
        v = getattr(self.module, self.name).detach()
        return ((v.double() + self.offset) * self.factor - self.offset).to(v.dtype)


@dataclass(frozen=True)
class Patch:
    """The maps of one removal set, merged: the tensors to swap in, and whether that unties the LM head."""

    method: str
    removal: tuple
    maps: tuple[Map, ...] = ()
    replacements: tuple[Replacement, ...] = ()
    untied: bool = False  # the token embeddings were the LM head's too: the patched model has its own
    merged_into: tuple[str, ...] = ()  # per map, where it went, in original block numbering

    def __add__(self, other: "Patch") -> "Patch":
        return Patch(self.method, other.removal, self.maps + other.maps, self.replacements + other.replacements,
                     self.untied or other.untied, self.merged_into + other.merged_into)


def _times(weight: torch.Tensor, matrix: torch.Tensor, rows_are_outputs: bool) -> torch.Tensor:
    """The weight whose outputs are the old outputs times ``matrix`` (in float64, cast back)."""
    w, t = weight.detach().double(), matrix.to(weight.device, torch.float64)
    return (t.T @ w if rows_are_outputs else w @ t).to(weight.dtype)


def merge_map(model: nn.Module, m: Map, method: str, removal: tuple) -> Patch:
    """The replacements that merge ``m`` into the model (not yet applied: see ``applied``).

    ``model`` is the full model (no blocks removed), so block indices are the original ones;
    ``removal`` holds the blocks removed up to this map's run.
    """
    family = family_of(model)
    if m.first > 0:
        path, source = family.mlp_out, m.first - 1
        renumbered = source - sum(1 for i in removal if i < source)
        targets = [(f"block {source}'s {path} (block {renumbered} of the pruned model)",
                    module_at(get_blocks(model)[source], path))]
    else:
        targets = [(p, module) for p, module in input_embeddings(model)]
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    out, untied = [], False
    for _, module in targets:
        if isinstance(module, nn.Embedding):  # (vocabulary, d): each row is an output vector
            out.append(Replacement(module, "weight", _times(module.weight, m.matrix, rows_are_outputs=False)))
            untied = untied or module.weight is head_weight
        else:  # nn.Linear stores (out, in); GPT-2's Conv1D (in, out)
            out.append(Replacement(module, "weight", _times(module.weight, m.matrix,
                                                            rows_are_outputs=not family.transposed_linears)))
        if getattr(module, "bias", None) is not None:
            out.append(Replacement(module, "bias", _times(module.bias.view(1, -1), m.matrix, False).view(-1)))
    where = " + ".join(p for p, _ in targets)
    return Patch(method, removal, (m,), tuple(out), untied, (where,))


def by_block(model: nn.Module, patch: Patch) -> dict[int | None, list[Replacement]]:
    """The patch's replacements by the index of the block they live in (None: outside the blocks, the
    embeddings of a map for a run from block 0)."""
    owner = {id(m): i for i, block in enumerate(get_blocks(model)) for m in block.modules()}
    out: dict[int | None, list[Replacement]] = {}
    for r in patch.replacements:
        out.setdefault(owner.get(id(r.module)), []).append(r)
    return out


def scaled_contributions(model: nn.Module, factors: dict[int, float]) -> tuple[Replacement, ...]:
    """Replacements that multiply what block i adds to the stream by factors[i], for each block named.

    The attention's and the MLP's outputs are linear in their output projections' weight and bias, so those
    are scaled; where a norm follows them before the residual add (Gemma's post norms, which multiply by
    ``norm_offset`` + weight), that norm's weight is set so that its output scales instead.
    """
    family, blocks = family_of(model), get_blocks(model)
    out = []
    for index, factor in factors.items():
        for projection, norm in ((family.attention_out, family.attention_norm), (family.mlp_out, family.mlp_norm)):
            module = module_at(blocks[index], norm or projection)
            for name in ("weight", "bias") if norm is None else ("weight",):
                if getattr(module, name, None) is not None:
                    out.append(Replacement(module, name, factor=factor,
                                           offset=family.norm_offset if norm is not None else 0.0))
    return tuple(out)


@contextmanager
def applied(model: nn.Module, patch: Patch | None) -> Iterator[nn.Module]:
    """``model`` with the patch's tensors in place of its own, restored on exit.

    The replaced parameters are swapped as objects, so a tie (GPT-2's wte and
    lm_head) is broken while the patch is applied and restored afterwards; the
    config says untied meanwhile, so save_pretrained writes both matrices.
    """
    if patch is None or not patch.replacements:
        yield model
        return
    originals = [(r.module, r.name, getattr(r.module, r.name)) for r in patch.replacements]
    tied = getattr(model.config, "tie_word_embeddings", None)
    try:
        values = [r.tensor() for r in patch.replacements]  # all from the parameters as they were
        for r, value, (_, _, old) in zip(patch.replacements, values, originals):
            setattr(r.module, r.name, nn.Parameter(value, requires_grad=old.requires_grad))
        if patch.untied:
            model.config.tie_word_embeddings = False
        yield model
    finally:
        for module, name, old in originals:
            setattr(module, name, old)
        if patch.untied:
            model.config.tie_word_embeddings = tied
