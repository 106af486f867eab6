"""Training-free compensation (--patch): a linear map fitted on calibration
tokens for each removed run of blocks, merged into the weights
(models.compensation), and the evaluation of patched configurations.

For a maximal run a..b of removed blocks, let S be the stream leaving block
a-1 (the last kept block), M its MLP output (S = h_mid + M) and Y the stream
leaving block b in the unpruned model. The patched model leaves block a-1
with h_mid + M T = S + M (T - I). A run starting at block 0 maps the whole
stream entering block 0: M = S = the embeddings' sum. The methods, one
registry entry each:

- ``lstsq``: ReplaceMe's least-squares form (Shopkhoev et al., 2025,
  "ReplaceMe: Network Simplification via Depth Pruning and Transformer Block
  Linear Replacement"): T = argmin ||M T + h_mid - Y||, solved in float64
  from the normal equations, accumulated over the calibration windows
  (memory: two d x d matrices, never the tokens). A tiny ridge (RIDGE times
  the mean eigenvalue of M^T M) pulls T towards the identity rather than
  towards zero, so directions the calibration tokens never excite keep the
  MLP output as it was; with M^T M well conditioned this is ReplaceMe's
  solution to rounding, and an identity run gives T = I exactly.
- ``cosine``: ReplaceMe's cosine-distance variant (same paper): T minimises
  the mean cosine distance between S + M (T - I) and Y over the calibration
  tokens, by COSINE_STEPS full-batch Adam steps started from the least-squares
  T (the paper's starting point and step count differ; the best iterate is
  kept, so the cosine distance is never worse than the lstsq map's). It holds
  M, S and Y of every calibration token in memory.
- ``magnitude``: Prune&Comp's magnitude compensation (Chen et al., 2026,
  "Prune&Comp: Free Lunch for Layer-Pruned LLMs via Iterative Pruning with
  Magnitude Compensation", AAAI): removing a run leaves the stream after it
  smaller (or larger) than the unpruned model's, and one scalar per run closes
  that gap: A = mean ||Y|| / mean ||S|| over the calibration tokens. Every
  kept block after the run adds its contributions divided by A
  (models.compensation.scaled_contributions), which, since every later block
  and the final norm see the stream through a scale-invariant norm, is the
  model with the stream after the gap multiplied by A (up to the norms'
  epsilon), without touching the embeddings or the LM head. A run at the end
  of the model has nothing after it: its scale changes nothing.

Several runs are fitted in order: each map (or scale) is fitted on the
activations of the model with the earlier runs already removed and patched,
so it sees what the patched model will feed it; its target is always the
unpruned model's. A later run's scale is then the whole factor between the
patched model's stream and the unpruned one's at that run, and it replaces
the earlier factor for the blocks after it.

Patched configurations are evaluated together in the shared-prefix engine,
each patched block a node of its own (evaluation.engine), so they share the
blocks before their first patched one; a map merged into the embeddings is
evaluated one model at a time (evaluation.sweep.measure) with its tensors
swapped in and restored afterwards (models.compensation.applied).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from evaluation.engine import run_pass
from evaluation.sweep import EvalSettings, Measurement, finish, measure
from evaluation.windows import Window, window_batches
from models.compensation import (Map, Patch, applied, by_block, check_patchable, merge_map, removed_runs,
                                 scaled_contributions)
from models.families import block_output, family_of, get_blocks, module_at, record_block_calls
from models.removal import removed_blocks
from models.units import Removal, canonical, config_key, kept_blocks, kept_nodes
from pruning.rules import Cost
from utils.errors import KitError
from utils.log import progress_bar

log = logging.getLogger("gpt2-pruning-kit")

NONE = "none"
# Ridge of the normal equations, relative to the mean eigenvalue of M^T M.
RIDGE = 1e-9
COSINE_STEPS = 100
COSINE_LR = 1e-4
# Below this many calibration tokens per dimension of the stream a d x d map is warned about. SmolLM2 (width
# 576), blocks 13-15 removed, evaluation PPL 83.04 plain: lstsq fitted on 256 tokens gave 117.40, on 1,024
# 85.34, on 2,048 69.52, on 4,096 66.01 (docs/compensation.md).
MIN_TOKENS_PER_DIMENSION = 4
# Patched configurations evaluated together: each holds its fitted map (d x d, float64) and the weight it was
# merged into until its row is written, so a group is kept small (a 7B model's lstsq patch is about 0.2 GB).
PATCHED_GROUP = 8
# How far the merged embeddings may be from (embedding sum) T on calibration tokens, relative to its largest entry.
EMBEDDING_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    paper: str
    keeps_tokens: bool  # needs every calibration token's activations (not only M^T M and M^T (Y - S))
    scales: bool = False  # one scalar per run, folded into the blocks after it (not a d x d map before it)

    @property
    def merged(self) -> str:
        """How the card says it went into the weights."""
        if self.scales:
            return ("was compensated by one scale, the ratio of the unpruned model's stream norm after the run to the "
                    "pruned model's, divided out of what every later block adds to the stream (its output "
                    "projections, or Gemma's post norms)")
        return ("was replaced by a linear map fitted on calibration text and merged into the weights that feed "
                "the residual stream before the run")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lstsq", "least squares", "Shopkhoev et al., 2025, ReplaceMe (least-squares form)", False),
    Method("cosine", "cosine distance", "Shopkhoev et al., 2025, ReplaceMe (cosine-distance variant)", True),
    Method("magnitude", "magnitude scale", "Chen et al., 2026, Prune&Comp (magnitude compensation, AAAI)", False,
           scales=True),
)}


class _Stop(Exception):
    """Raised by the last tap of a pass: nothing after it is needed."""


def _tap_pass(model: nn.Module, inputs: torch.Tensor, taps: Sequence[tuple[nn.Module, str]]) -> list[torch.Tensor]:
    """The tensors at ``taps`` ((module, 'in' | 'out')) in one forward pass of the model's body, as
    (tokens, d) rows; the pass stops once every tap has fired."""
    got: dict[int, torch.Tensor] = {}
    handles = []

    def record(i: int, tensor: torch.Tensor) -> None:
        got[i] = tensor.reshape(-1, tensor.shape[-1])
        if len(got) == len(taps):
            raise _Stop

    for i, (module, kind) in enumerate(taps):
        if kind == "in":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: record(i, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, i=i: record(i, block_output(m, out))))
    try:
        model.base_model(input_ids=inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(got) != len(taps):
        raise RuntimeError("a calibration tap did not fire")
    return [got[i] for i in range(len(taps))]


def _windows(n_tokens: int, max_length: int) -> list[Window]:
    """Non-overlapping windows, as the one-pass scores take them: every calibration token once."""
    return [Window(b, min(b + max_length, n_tokens), b) for b in range(0, n_tokens, max_length)]


@torch.no_grad()
def run_activations(model: nn.Module, first: int, last: int, before: Patch | None, ids: torch.Tensor,
                    max_length: int, batch_size: int = 1,
                    mlp: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(M, S, Y) of each calibration batch for the run first..last, as float64 (tokens, d) rows.

    M and S come from the model with the runs of ``before`` removed and
    patched; Y from the unpruned model. Without ``mlp`` M is S (a scale needs
    only the stream).
    """
    blocks, family = get_blocks(model), family_of(model)
    if first == 0 or not mlp:
        source = [(blocks[first - 1], "out")] if first else [(blocks[0], "in")]
    else:
        source = [(module_at(blocks[first - 1], family.mlp_out), "out"), (blocks[first - 1], "out")]
    target = [(blocks[last], "out")]
    earlier = before.removal if before is not None else ()
    device = next(model.parameters()).device
    for batch in window_batches(_windows(len(ids), max_length), batch_size):
        inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
        if not earlier:
            got = _tap_pass(model, inputs, source + target)
        else:
            with removed_blocks(model, earlier), applied(model, before):
                got = _tap_pass(model, inputs, source)
            got += _tap_pass(model, inputs, target)
        got = [t.double() for t in got]
        m, s, y = (got[0], got[0], got[1]) if len(got) == 2 else got
        yield m, s, y


def solve_lstsq(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """D = (M^T M + ridge I)^-1 M^T (Y - S): the least-squares T - I, in float64."""
    d = gram.shape[0]
    ridge = RIDGE * max(torch.trace(gram).item() / d, 1e-30)
    return torch.linalg.solve(gram + ridge * torch.eye(d, dtype=gram.dtype, device=gram.device), cross)


def cosine_distance(m: torch.Tensor, s: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(S + M D, Y)."""
    return 1.0 - torch.nn.functional.cosine_similarity(s + m @ delta, y, dim=-1).mean()


def solve_cosine(m: torch.Tensor, s: torch.Tensor, y: torch.Tensor, start: torch.Tensor,
                 steps: int = COSINE_STEPS, lr: float = COSINE_LR) -> torch.Tensor:
    """D minimising the mean cosine distance, by full-batch Adam from ``start``; the best iterate (float64)."""
    m, s, y = m.float(), s.float(), y.float()
    delta = start.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    best, best_loss = start.clone(), cosine_distance(m, s, y, delta.detach()).item()
    for _ in range(steps):
        with torch.enable_grad():
            loss = cosine_distance(m, s, y, delta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        now = cosine_distance(m, s, y, delta.detach()).item()
        if now < best_loss:
            best, best_loss = delta.detach().double().clone(), now
    return best


def fit_map(model: nn.Module, first: int, last: int, method: str, before: Patch | None, ids: torch.Tensor,
            max_length: int, batch_size: int = 1) -> Map:
    """The map of run first..last by ``method``, with its cost: tokens, seconds, bytes of what it held."""
    start = time.perf_counter()
    gram = cross = None
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    tokens = 0
    for m, s, y in run_activations(model, first, last, before, ids, max_length, batch_size):
        gram = m.T @ m if gram is None else gram + m.T @ m
        cross = m.T @ (y - s) if cross is None else cross + m.T @ (y - s)
        tokens += m.shape[0]
        if METHODS[method].keeps_tokens:
            kept.append((m.float(), s.float(), y.float()))
    d = gram.shape[0]
    delta = solve_lstsq(gram, cross)
    info = {"tokens": tokens, "system_bytes": 2 * d * d * 8}
    if METHODS[method].keeps_tokens:
        m, s, y = (torch.cat(parts) for parts in zip(*kept))
        info["lstsq_cosine_distance"] = cosine_distance(m, s, y, delta.float()).item()
        delta = solve_cosine(m, s, y, delta)
        info["cosine_distance"] = cosine_distance(m, s, y, delta.float()).item()
        info["activation_bytes"] = 3 * m.numel() * 4
    matrix = torch.eye(d, dtype=torch.float64, device=delta.device) + delta
    info["seconds"] = time.perf_counter() - start
    return Map(first, last, matrix.cpu(), info)


@torch.no_grad()
def check_input_map(model: nn.Module, patch: Patch, m: Map, ids: torch.Tensor, max_length: int) -> None:
    """Refuse a block-0 map that the merged embeddings do not reproduce on calibration tokens."""
    inputs = ids[:max_length].view(1, -1).to(next(model.parameters()).device)
    expected = record_block_calls(model, inputs)[0].double() @ m.matrix.to(inputs.device)
    with applied(model, patch):
        got = record_block_calls(model, inputs)[0].double()
    error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    if error > EMBEDDING_TOLERANCE:
        raise KitError(f"--patch cannot merge the map of removed blocks 0..{m.last} into this "
                       f"{family_of(model).model_type} model's embeddings exactly (relative error {error:.2g}): "
                       "something else is added before block 0; keep block 0, or use --patch none")


def fit_patch(model: nn.Module, removal: Sequence, method: str, ids: torch.Tensor, max_length: int,
              batch_size: int = 1, progress: bool = True) -> Patch:
    """Every run's map of ``removal``, fitted on ``ids`` in order and merged (not applied)."""
    if method not in METHODS:
        raise KitError(f"unknown --patch method '{method}' (choices: {', '.join([NONE, *METHODS])})")
    if len(ids) < 2:
        raise KitError("--patch needs at least 2 calibration tokens; raise --calib-tokens")
    removal = canonical(removal)
    runs = check_patchable(model, removal, maps=not METHODS[method].scales)
    if METHODS[method].scales:
        return fit_scales(model, runs, ids, max_length, batch_size)
    warn_few_tokens(len(ids), model.config.hidden_size, method)
    patch = Patch(method, ())
    bar = progress_bar(total=len(runs), desc=f"fitting {method} maps", unit="map", leave=False,
                       disable=not progress or len(runs) < 2)
    for first, last in runs:
        m = fit_map(model, first, last, method, patch if patch.replacements else None, ids, max_length, batch_size)
        done = tuple(i for a, b in runs if b <= last for i in range(a, b + 1))
        merged = merge_map(model, m, method, done)
        if first == 0:
            check_input_map(model, merged, m, ids, max_length)
        patch = patch + merged
        info = m.info
        extra = (f", cosine distance {info['lstsq_cosine_distance']:.4g} -> {info['cosine_distance']:.4g}"
                 if "cosine_distance" in info else "")
        log.info(f"Fitted a {method} map for removed blocks {first}..{last} into {merged.merged_into[0]} on "
                 f"{info['tokens']:,} calibration tokens in {info['seconds']:.2f} s (d x d systems: "
                 f"{info['system_bytes'] / 1e6:.1f} MB{extra})"
                 + ("; the token embeddings are untied from the LM head" if merged.untied else ""))
        bar.update()
    bar.close()
    return patch


_warned: set[tuple[int, int, str]] = set()


def warn_few_tokens(tokens: int, width: int, method: str) -> None:
    """Once per run: a d x d map fitted on few tokens per dimension fits the calibration text, not the rest."""
    if tokens < MIN_TOKENS_PER_DIMENSION * width and (tokens, width, method) not in _warned:
        _warned.add((tokens, width, method))
        log.warning(f"--patch {method} fits a {width} x {width} map on {tokens:,} calibration tokens, fewer than "
                    f"{MIN_TOKENS_PER_DIMENSION} per dimension: it can fit the calibration text and not other text "
                    f"(docs/compensation.md); give --calib-tokens {MIN_TOKENS_PER_DIMENSION * width:,} or more, or "
                    "use --patch magnitude")


def fit_scales(model: nn.Module, runs: Sequence[tuple[int, int]], ids: torch.Tensor, max_length: int,
               batch_size: int = 1) -> Patch:
    """Prune&Comp's scale for each run, measured in order on the model with the earlier runs removed and
    scaled; merged as the factor each kept block's contributions are divided by."""
    n_blocks = len(get_blocks(model))
    removed = {i for a, b in runs for i in range(a, b + 1)}
    maps: list[Map] = []
    patch = Patch(NONE, ())
    for first, last in runs:
        start = time.perf_counter()
        gap = target = 0.0
        tokens = 0
        earlier = patch if patch.replacements else None
        for _, s, y in run_activations(model, first, last, earlier, ids, max_length, batch_size, mlp=False):
            gap += s.norm(dim=-1).sum().item()
            target += y.norm(dim=-1).sum().item()
            tokens += s.shape[0]
        scale = target / gap if gap > 0 else 1.0
        maps.append(Map(first, last, None, {"tokens": tokens, "system_bytes": 0, "scale": scale,
                                            "seconds": time.perf_counter() - start}))
        factors = _factors(maps, removed, n_blocks)
        patch = Patch("magnitude", tuple(sorted(i for a, b in runs if b <= last for i in range(a, b + 1))),
                      tuple(maps), scaled_contributions(model, {j: 1.0 / m.info["scale"] for j, m in factors.items()}),
                      False,
                      tuple(_scaled_where(m, factors) for m in maps))
        log.info(f"Fitted a magnitude scale for removed blocks {first}..{last} on {tokens:,} calibration tokens in "
                 f"{maps[-1].info['seconds']:.2f} s: the unpruned stream after the run is {scale:.4g} times the "
                 f"pruned one" + ("" if last < n_blocks - 1 else "; no block follows the run, so it changes nothing"))
    return patch


def _factors(maps: Sequence[Map], removed: set[int], n_blocks: int) -> dict[int, Map]:
    """The run whose scale divides each kept block's contributions: the latest one before it."""
    factors = {}
    for j in range(n_blocks):
        before = [m for m in maps if m.last < j]
        if j not in removed and before:
            factors[j] = before[-1]
    return factors


def _scaled_where(m: Map, factors: dict[int, Map]) -> str:
    """Which blocks a run's scale divides, in words (original numbering)."""
    blocks = [j for j, owner in factors.items() if owner is m]
    return (f"blocks {blocks[0]}..{blocks[-1]} (what they add divided by {m.info['scale']:.4g})" if blocks
            else "nothing (no block follows the run)")


def describe(patch: Patch) -> dict:
    """What was fitted, by which method, at what cost: for the sidecar and the model card."""
    return {"method": patch.method, "paper": METHODS[patch.method].paper, "merged": METHODS[patch.method].merged,
            "untied_embeddings": patch.untied,
            "seconds": sum(m.info["seconds"] for m in patch.maps),
            "maps": [{"removed_blocks": list(range(m.first, m.last + 1)), "merged_into": where, **m.info}
                     for m, where in zip(patch.maps, patch.merged_into)]}


@contextmanager
def logged_messages(name: str = "gpt2-pruning-kit") -> Iterator[list[str]]:
    """The messages logged to ``name`` inside the block (calibration_ids says in words which text it took)."""
    messages: list[str] = []
    logger = logging.getLogger(name)
    level, propagate, shown = logger.level, logger.propagate, logger.getEffectiveLevel()

    class Keep(logging.Handler):
        """Keeps every message, and passes on those the run shows (--quiet hides the info ones)."""

        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
            if propagate and record.levelno >= shown and logger.parent is not None:
                logger.parent.handle(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(min(shown, logging.INFO))
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@dataclass
class Fitter:
    """Fits patches for a run on its calibration tokens, loaded once; keeps the latest and a record of each."""

    model: nn.Module
    load_ids: Callable[[], torch.Tensor]
    max_length: int
    batch_size: int = 1
    progress: bool = True
    # For the sidecar, filled in as maps are fitted: the calibration text in calibration_ids' own words,
    # its tokens, and describe() of each patched configuration by its config key.
    info: dict = field(default_factory=lambda: {"calibration": None, "calibration_tokens": None,
                                                "configurations": {}})
    _ids: torch.Tensor | None = field(default=None, repr=False)
    _last: tuple | None = field(default=None, repr=False)

    @property
    def ids(self) -> torch.Tensor:
        if self._ids is None:
            with logged_messages() as said:
                self._ids = self.load_ids()
            self.info.update(calibration=" ".join(said) or f"{len(self._ids):,} calibration tokens",
                             calibration_tokens=len(self._ids))
        return self._ids

    def __call__(self, removal: Sequence, method: str) -> Patch:
        key = (canonical(removal), method)
        if self._last is None or self._last[0] != key:
            patch = fit_patch(self.model, removal, method, self.ids, self.max_length, self.batch_size, self.progress)
            self.info["configurations"][config_key(key[0], method)] = describe(patch)
            self._last = (key, patch)
        return self._last[1]


def configurations(method: str, removals: Sequence[Removal], patched: Sequence[Removal] | None,
                   model: nn.Module) -> list[tuple[Removal, str]]:
    """(removal set, method) of every row to measure, the baseline first.

    Without a patch, every set as it is. With one, every set patched; or, where
    the mode names the sets to patch (``patched``: compare patches each rule's
    pick), every set as it is and those also patched. Refuses, before any
    work, a set that cannot be patched.
    """
    plain = [((), NONE)] + [(canonical(r), NONE) for r in removals]
    if method == NONE:
        return plain
    targets = [canonical(r) for r in (removals if patched is None else patched) if r]
    for r in targets:
        check_patchable(model, r, maps=not METHODS[method].scales)
    rows = [((), NONE)] if patched is None else plain
    return list(dict.fromkeys(rows + [(r, method) for r in targets]))


def patched_kept(n_blocks: int, removal: Removal, method: str, tag: object) -> tuple:
    """The engine's kept list of ``removal`` patched by ``method``, without fitting it: every node from the
    first one the patch replaces (a map: the block before the first run, or everything for a run from
    block 0; a scale: the first block after the first run) made unique by ``tag``, since the patched
    configuration shares nothing from there on."""
    kept = kept_nodes(n_blocks, removal)
    runs = removed_runs(removal)
    if not runs:
        return kept
    first = runs[0][1] + 1 if METHODS[method].scales else runs[0][0] - 1
    return tuple(node if node[0] < first else (node[0], node[1], tag) for node in kept)


def fit_cost(n_blocks: int, removal: Removal, method: str, tokens: int, max_length: int) -> Cost:
    """What fitting ``method``'s patch for ``removal`` on ``tokens`` calibration tokens costs: per run, the
    pass up to the run's last block on the unpruned model, and after an earlier run a second pass, up to
    the block before the run, on the pruned and patched model; each over non-overlapping windows."""
    windows = math.ceil(tokens / max_length)
    block_evals = passes = 0
    kept = set(kept_blocks(n_blocks, removal))
    for r, (first, last) in enumerate(removed_runs(removal)):
        block_evals += last + 1 + (sum(1 for i in kept if i < first) if r else 0)
        passes += 2 if r else 1
    return Cost(passes=passes, tokens=passes * tokens, block_evals=block_evals * windows)


def touches_embeddings(model: nn.Module, patch: Patch) -> bool:
    """Whether the patch replaces a tensor outside the blocks (a map for a run from block 0)."""
    return None in by_block(model, patch)


def measure_patched(model: nn.Module, ids: torch.Tensor, prompt_ids: torch.Tensor | None,
                    configs: Sequence[tuple[Removal, str]], settings: EvalSettings,
                    fit: Callable[[Removal, str], Patch]) -> Iterator[tuple[Measurement, str]]:
    """Measurements of patched (removal set, method) pairs, PATCHED_GROUP at a time in one shared-prefix pass
    with the baseline (intervals and, with --kl, divergence, as the plain sweep has them); a patch of the
    embeddings one model at a time. Size, speed and tasks are measured with each patch applied."""
    w = settings.windows
    for start in range(0, len(configs), PATCHED_GROUP):
        fitted = [(removal, method, fit(removal, method))
                  for removal, method in configs[start : start + PATCHED_GROUP]]
        alone = [touches_embeddings(model, patch) for _, _, patch in fitted]
        shared = [f for f, own in zip(fitted, alone) if not own]
        if shared:
            results, work = run_pass(model, ids, [r for r, _, _ in shared], w.max_length, w.stride, w.batch_size,
                                     progress=settings.progress, desc="patched pass", protocol=w.protocol,
                                     prefix_token=w.prefix_token, compare=True, divergence=settings.divergence,
                                     patches=[p for _, _, p in shared])
            for (removal, method, patch), result in zip(shared, results):
                with applied(model, patch):
                    yield finish(model, prompt_ids, removal, result, settings, work), method
                work = None  # a pass's cost is carried by its first measurement
        for (removal, method, patch), own in zip(fitted, alone):
            if own:
                with applied(model, patch):
                    yield measure(model, ids, prompt_ids, removal, settings), method
