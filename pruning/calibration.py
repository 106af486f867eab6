"""What the choosing modes look at: the model on calibration tokens.

Calibration holds the model and the calibration tokens, and answers the two
questions the scoring rules (pruning.rules) and searches (pruning.search) ask:
the calibration perplexity of any removal sets (evaluated together in one
shared-prefix pass, and cached), and the residual stream's cosines and angles
between every pair of unit boundaries (from one forward pass, with hooks
between the blocks and on every attention's output).

The unit boundaries are the residual stream entering block 0, then after
each sublayer in the order the block adds it: entering block i + its
attention's output (the stream between attention i and MLP i), then leaving
block i. For a parallel-residual block (GPT-NeoX), whose MLP reads the
stream entering the block, the middle boundary is still "after the attention
is added", so each sublayer's score is the turn its own output gives the
stream.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import nn
from utils.log import progress_bar

from config import DataSpec
from evaluation.engine import count_nodes, prefix_tree, sweep_perplexities
from evaluation.perplexity import perplexity
from models.compensation import applied
from models.removal import removed_units
from evaluation.windows import DEFAULT_PROTOCOL, Window, make_windows, window_batches
from models.families import family_of, get_blocks, module_at
from models.units import SUBLAYERS, Removal, Unit, candidate_units, canonical, kept_nodes
from pruning.compensation import fit_cost, fit_patch, patched_kept, touches_embeddings
from pruning.rules import Cost
from utils.cache import cached_token_ids
from utils.data import is_local_dataset, load_text, tokenize
from utils.errors import KitError

log = logging.getLogger("gpt2-pruning-kit")

# A view's share of the calibration tokens: [begin, end), or None for all of them.
Span = tuple[int, int] | None

def calibration_ids(data: DataSpec, calib_tokens: int, tokenizer, stream: torch.Tensor | None = None,
                    cache_dir: str | None = None) -> torch.Tensor:
    """The first --calib-tokens tokens of the dataset's train split.

    Rules must choose on other text than they are judged on, or a comparison
    of rules is self-fulfilling. A local file has one split: calibration then
    takes the tokens after the --max-tokens evaluated ones when there are
    enough, and otherwise the evaluated tokens themselves, with a warning; so
    does a Hub dataset without a train split. ``stream``, the local file's
    token ids when the caller has them already, saves reading them again.
    """
    if is_local_dataset(data.dataset):
        ids = stream if stream is not None else cached_token_ids(tokenizer, data.dataset, data.split,
                                                                 data.text_column, cache_dir)
        held_out = ids[data.max_tokens :] if data.max_tokens else ids[:0]
        if len(held_out) >= calib_tokens:
            log.info(f"Calibrating on tokens {data.max_tokens:,}.. of '{data.dataset}', after the evaluated ones "
                     "(a local file has no train split)")
            return held_out[:calib_tokens]
        log.warning(f"Calibration uses the evaluated tokens of '{data.dataset}' (a local file has no train split, "
                    "and --max-tokens leaves too few after them), so blocks are chosen on the tokens they are "
                    "judged on")
        return ids[:calib_tokens]
    if data.split == "train":
        log.warning("Evaluating on the train split, which is also the calibration text: blocks are chosen "
                    "on the tokens they are judged on")
    try:
        text = load_text(data.dataset, "train", data.text_column)
    except KitError as exc:
        if "no split" not in str(exc):
            raise
        log.warning(f"Dataset '{data.dataset}' has no train split; calibrating on the '{data.split}' split, "
                    "the one perplexity is evaluated on")
        text = load_text(data.dataset, data.split, data.text_column)
    ids = leading_ids(tokenizer, text, calib_tokens)
    log.info(f"Calibrating on {len(ids):,} tokens")
    if len(ids) < calib_tokens:
        log.warning(f"Calibration text has only {len(ids):,} tokens (--calib-tokens {calib_tokens:,})")
    return ids


def leading_ids(tokenizer, text: str, n: int) -> torch.Tensor:
    """The first n tokens of ``text`` without tokenizing all of it (a train split can hold millions).

    GPT-2's pre-tokenizer splits text into words before BPE, so cutting the
    text changes only the tokens of the last word; a prefix that yields well
    over n tokens gives exactly the first n tokens of the whole text.
    """
    margin = 64
    ids = tokenize(tokenizer, text[: (n + margin) * 8])
    if len(ids) <= n + margin and len(text) > (n + margin) * 8:
        ids = tokenize(tokenizer, text)
    return ids[:n]


@dataclass(frozen=True)
class OnePassScores:
    """``cos[a, b]`` and ``angle[a, b]``: mean cosine and mean angular distance
    (arccos/pi) over calibration tokens between the residual stream at unit
    boundaries a and b: boundary 2i enters block i, 2i+1 follows its attention,
    2i+2 leaves it (2L: leaving the last block)."""

    cos: torch.Tensor  # (2L+1, 2L+1) float64
    angle: torch.Tensor  # (2L+1, 2L+1) float64
    tokens: int

    @property
    def n_blocks(self) -> int:
        return (self.cos.shape[0] - 1) // 2

    def bi(self) -> list[float]:
        """Block Influence of every block (ShortGPT)."""
        return [1.0 - self.cos[2 * i, 2 * i + 2].item() for i in range(self.n_blocks)]

    def angular(self, n: int) -> dict[Removal, float]:
        """Angular distance across every span of n consecutive blocks (Gromov et al.)."""
        return {tuple(range(i, i + n)): self.angle[2 * i, 2 * i + 2 * n].item() for i in range(self.n_blocks - n + 1)}

    def unit_bi(self) -> dict[Unit, float]:
        """Block Influence of every sublayer: 1 - cos between the stream before and after it is added."""
        return {f"{kind}{u // 2}": 1.0 - self.cos[u, u + 1].item()
                for u, kind in zip(range(2 * self.n_blocks), SUBLAYERS * self.n_blocks)}

    def unit_angular(self, n: int) -> dict[Removal, float]:
        """Angular distance across every run of n consecutive sublayers (attn0, mlp0, attn1, ...)."""
        names = [f"{kind}{u // 2}" for u, kind in zip(range(2 * self.n_blocks), SUBLAYERS * self.n_blocks)]
        return {canonical(names[u : u + n]): self.angle[u, u + n].item() for u in range(2 * self.n_blocks - n + 1)}


def _stream_hooks(model: nn.Module, blocks: nn.ModuleList, states: list) -> list:
    """Hooks that append the hidden state entering block 0, then each block's attention output and the
    state leaving the block (one_pass_scores turns them into unit boundaries)."""

    def entering(module, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])

    def leaving(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    attention = family_of(model).attention_added  # Gemma: the norm of the attention's output
    handles = [blocks[0].register_forward_pre_hook(entering, with_kwargs=True)]
    for block in blocks:
        handles.append(module_at(block, attention).register_forward_hook(leaving))
        handles.append(block.register_forward_hook(leaving))
    return handles


def unit_boundaries(states: list[torch.Tensor]) -> list[torch.Tensor]:
    """[entering 0, attention 0's output, leaving 0, ...] -> the stream at every unit boundary."""
    bounds = [states[0]]
    for i in range(1, len(states), 2):
        bounds += [bounds[-1] + states[i], states[i + 1]]
    return bounds


@torch.no_grad()
def one_pass_scores(model: nn.Module, ids: torch.Tensor, max_length: int, batch_size: int = 1,
                    progress: bool = True) -> OnePassScores:
    """bi and all spans' angular distances from one pass over ``ids``.

    The tokens are cut into non-overlapping windows of ``max_length``, so every
    calibration token contributes exactly once. Cosines are taken in float64 so
    that an exact identity block scores 0 to rounding.
    """
    blocks = get_blocks(model)
    size = 2 * len(blocks) + 1
    device = next(model.parameters()).device
    cos_sum = torch.zeros(size, size, dtype=torch.float64, device=device)
    angle_sum = torch.zeros_like(cos_sum)
    tokens = 0
    # every token is a position to score here, the first of a window included
    windows = [Window(begin, min(begin + max_length, len(ids)), begin) for begin in range(0, len(ids), max_length)]
    states: list[torch.Tensor] = []
    handles = _stream_hooks(model, blocks, states)
    bar = progress_bar(total=len(windows), desc="calibration pass", unit="win", leave=False, disable=not progress)
    try:
        for batch in window_batches(windows, batch_size):
            inputs = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
            states.clear()
            model.base_model(input_ids=inputs, use_cache=False)
            # (L+1, tokens, D), each token's hidden state normalized to unit length
            stream = torch.stack([s.reshape(-1, s.shape[-1]) for s in unit_boundaries(states)]).double()
            stream = stream / stream.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cos = torch.einsum("atd,btd->abt", stream, stream).clamp(-1.0, 1.0)
            cos_sum += cos.sum(-1)
            angle_sum += (torch.arccos(cos) / math.pi).sum(-1)
            tokens += stream.shape[1]
            bar.update(len(batch))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return OnePassScores((cos_sum / tokens).cpu(), (angle_sum / tokens).cpu(), tokens)


@dataclass
class CalibrationCache:
    """What every view of one calibration shares (Calibration.at, Calibration.tokens): the tokens, the
    calibration perplexity of each removal set scored on each span of them, and the one-pass scores of
    each span. The one-pass scores cover every unit boundary, so blocks and sublayers read the same pass;
    ``passes``, ``evaluations``, ``tokens`` and ``block_evals`` count the work done (rules.Cost)."""

    load_ids: Callable[[], torch.Tensor]  # called once, when a rule first needs tokens
    ids: torch.Tensor | None = None
    perplexity: dict[tuple[Span, Removal], float] = field(default_factory=dict)
    one_pass: dict[Span, OnePassScores] = field(default_factory=dict)
    passes: int = 0
    evaluations: int = 0
    tokens: int = 0
    block_evals: int = 0

    def work(self) -> Cost:
        return Cost(self.passes, self.evaluations, self.tokens, self.block_evals)


@dataclass(frozen=True)
class Calibration:
    """The model and calibration tokens every rule and search chooses with, at one kind of unit.

    Greedy, beam and the ppl rule evaluate many of the same sets, so their
    perplexities are cached by removal set in ``cache``, which views at other
    units share. A view of a span of the tokens (``tokens``: the first
    quarter for a race, pruning.race; a slice for the stability report,
    pruning.stability) shares the cache too, its entries keyed by the span.
    """

    model: nn.Module
    load_ids: Callable[[], torch.Tensor]
    max_length: int
    stride: int
    batch_size: int = 1
    progress: bool = True
    protocol: str = DEFAULT_PROTOCOL  # the evaluation's windows (evaluation.windows)
    prefix_token: int | None = None
    unit: str = "block"  # --unit: what the rules and searches take as candidates
    # --choose-patched: every set is scored with its own --patch fitted on this view's tokens (none: plain)
    patch: str = "none"
    cache: CalibrationCache | None = field(default=None, repr=False, compare=False)
    span: Span = None  # [begin, end) of the calibration tokens this view sees; None: all of them

    def __post_init__(self) -> None:
        if self.cache is None:
            object.__setattr__(self, "cache", CalibrationCache(self.load_ids))

    def at(self, unit: str) -> "Calibration":
        """The same calibration with other candidates, sharing every cached result."""
        return replace(self, unit=unit)

    def tokens(self, begin: int, end: int) -> "Calibration":
        """The view of this view's tokens [begin, end), sharing the cache (its entries keyed by the span)."""
        offset, total = (self.span or (0, 0))[0], len(self.all_ids)
        begin, end = offset + begin, offset + min(end, len(self.ids))
        if end - begin < 2:
            raise KitError(f"a slice of {end - begin} calibration tokens scores nothing; raise --calib-tokens")
        return replace(self, span=None if (begin, end) == (0, total) else (begin, end))

    def head(self, fraction: float) -> "Calibration":
        """The view of the first ``fraction`` of this view's tokens (at least 2)."""
        return self.tokens(0, max(2, math.ceil(len(self.ids) * fraction)))

    def slices(self, n: int) -> list["Calibration"]:
        """``n`` disjoint views of consecutive, equal shares of the tokens."""
        size = len(self.ids) // n
        if size < 2:
            raise KitError(f"--calib-slices {n} leaves {size} tokens a slice; raise --calib-tokens or use fewer")
        return [self.tokens(i * size, (i + 1) * size) for i in range(n)]

    @property
    def n_blocks(self) -> int:
        return len(get_blocks(self.model))

    @property
    def units(self) -> list[Unit]:
        """The candidates of --unit (models.units.candidate_units)."""
        return candidate_units(self.unit, self.n_blocks)

    @property
    def all_ids(self) -> torch.Tensor:
        cache = self.cache
        if cache.ids is None:
            cache.ids = cache.load_ids()
            if len(cache.ids) < 2:
                raise KitError("calibration needs at least 2 tokens; raise --calib-tokens")
        return cache.ids

    @property
    def ids(self) -> torch.Tensor:
        """The tokens of this view."""
        return self.all_ids if self.span is None else self.all_ids[self.span[0] : self.span[1]]

    def windows(self) -> list[Window]:
        return make_windows(len(self.ids), self.max_length, self.stride, self.protocol, self.prefix_token)

    def perplexities(self, removals: Sequence[Sequence[Unit]]) -> list[float]:
        """Calibration perplexity of each removal set (with ``patch``, of each set patched).

        The sets not yet cached are evaluated together, in one shared-prefix
        pass: a search step's candidates share most of their blocks.
        """
        keys = [(self.span, canonical(r)) if self.patch == "none" else (self.span, canonical(r), self.patch)
                for r in removals]
        known = self.cache.perplexity
        todo = list(dict.fromkeys(k for k in keys if k not in known))
        if todo:
            sets = [k[1] for k in todo]
            patches = self._fit(sets) if self.patch != "none" else [None] * len(sets)
            alone = [i for i, p in enumerate(patches) if p is not None and touches_embeddings(self.model, p)]
            shared = [i for i in range(len(sets)) if i not in set(alone)]
            if shared:
                results, work = sweep_perplexities(self.model, self.ids, [sets[i] for i in shared], self.max_length,
                                                   self.stride, self.batch_size, progress=self.progress,
                                                   desc="calibration", protocol=self.protocol,
                                                   prefix_token=self.prefix_token,
                                                   patches=[patches[i] for i in shared])
                known.update((todo[i], r.perplexity) for i, r in zip(shared, results))
                self.cache.tokens += work.tokens_scored
                self.cache.block_evals += work.block_evals
            for i in alone:  # a map merged into the embeddings: one model at a time
                with removed_units(self.model, sets[i]) as pruned, applied(pruned, patches[i]):
                    known[todo[i]] = perplexity(pruned, self.ids, self.max_length, self.stride, self.batch_size,
                                                progress=False, protocol=self.protocol,
                                                prefix_token=self.prefix_token).perplexity
                windows = self.windows()
                self.cache.tokens += sum(w.scored for w in windows)
                self.cache.block_evals += len(kept_nodes(self.n_blocks, sets[i])) * len(windows)
            self.cache.evaluations += len(todo)
        return [known[key] for key in keys]

    def _fit(self, sets: Sequence[Removal]) -> list:
        """Each set's patch fitted on this view's tokens, its cost counted in the cache."""
        patches = []
        for s in sets:
            patches.append(fit_patch(self.model, s, self.patch, self.ids, self.max_length, self.batch_size,
                                     progress=False))
            cost = fit_cost(self.n_blocks, s, self.patch, len(self.ids), self.max_length)
            self.cache.tokens += cost.tokens
            self.cache.block_evals += cost.block_evals
        return patches

    def cost_of(self, removals: Sequence[Sequence[Unit]]) -> Cost:
        """What scoring ``removals`` together on this view costs without a cache: each distinct set on
        every scored token, and one block evaluation per window for each node of their prefix tree (with
        ``patch``, each set's patched nodes its own, and its fit)."""
        sets = list(dict.fromkeys(canonical(r) for r in removals))
        if not sets:
            return Cost()
        windows = self.windows()
        if self.patch == "none":
            kept = [kept_nodes(self.n_blocks, s) for s in sets]
            fits = Cost()
        else:
            kept = [patched_kept(self.n_blocks, s, self.patch, i) for i, s in enumerate(sets)]
            fits = sum((fit_cost(self.n_blocks, s, self.patch, len(self.ids), self.max_length) for s in sets), Cost())
        nodes = count_nodes(prefix_tree(kept))
        return Cost(evaluations=len(sets), tokens=len(sets) * sum(w.scored for w in windows) + fits.tokens,
                    block_evals=nodes * len(windows) + fits.block_evals)

    def pass_cost(self) -> Cost:
        """What the one-pass scores cost: every block on every non-overlapping window of the tokens."""
        tokens = len(self.ids)
        return Cost(passes=1, tokens=tokens, block_evals=self.n_blocks * math.ceil(tokens / self.max_length))

    def one_pass(self) -> OnePassScores:
        if self.span not in self.cache.one_pass:
            self.cache.one_pass[self.span] = one_pass_scores(self.model, self.ids, self.max_length,
                                                             self.batch_size, self.progress)
            self.cache.passes += 1
            self.cache.tokens += len(self.ids)
            self.cache.block_evals += self.pass_cost().block_evals
        return self.cache.one_pass[self.span]

    def single_removal(self) -> dict[Removal, float]:
        """Calibration perplexity with each candidate unit removed alone (the ppl criterion)."""
        singles = [(u,) for u in self.units]
        return dict(zip(map(canonical, singles), self.perplexities(singles)))
