"""Shared-prefix perplexity for a whole sweep of removal sets in one pass.

A decoder with some blocks removed computes embeddings, then its kept blocks
in order, then the final norm and the LM head. Two configurations that keep
the same first blocks therefore share the hidden states up to the point where
their kept lists part. For every batch of evaluation windows this module
computes the embeddings once and walks the configurations' kept lists as a
prefix tree, depth first: each distinct prefix of kept blocks is one block
evaluation, its output is held only while the subtree below it is walked (at
most one hidden state per tree level), and a configuration's final layer norm,
LM head and loss run once, when the walk reaches the node where its kept list
ends.

A sequential sweep ("remove block i" for every i) becomes the baseline's chain
of blocks plus, for each i, blocks i+1..L-1 on top of the chain's state
entering block i: L(L-1)/2 + L block evaluations instead of L(L-1). Every
branch runs the very modules of the model on the very inputs the pruned model
would feed them: the model's own forward is run once per window batch with
recorders in place of its blocks (models.families.record_block_calls), and
each block is called with the arguments it received at its own position
(its attention kind's mask, rotary embeddings, position ids). The loss is
computed as evaluation.perplexity.scored_nll computes it, so each perplexity
equals the one-model-at-a-time evaluation of evaluation.perplexity.perplexity
to the last bit on a given device and batch size.

Removal sets may hold sublayers (models.units): a node of the tree is then a
(block, part) pair, part 'block' for the whole block or 'attn' / 'mlp' for a
block that keeps only that sublayer. A partial node is one call of the real
block with its other sublayer replaced by the stub removed_units uses
(models.removal.skipped_sublayer), so it is exact for sequential and
parallel-residual blocks alike, and sweeps over units share prefixes too.

A results pass (run_pass with ``compare``) also runs the baseline, the
tree's first path, and keeps each configuration's NLL per block of scored
tokens for its 95% intervals (evaluation.intervals); with ``divergence`` it
compares every configuration's next-token distribution with the baseline's
(evaluation.divergence). Its running state is evaluation.passfile.PassState,
which a PassCheckpoint saves as the pass goes, so an interrupted pass
continues where it stopped. The progress bar counts model FLOPs, block by
block, so a long window batch moves too.

A patched configuration (--patch, pruning.compensation) carries replacement
tensors for some of its kept blocks. Each such block is a node of its own
(block, part, variant): the block run with that configuration's tensors
swapped in (models.compensation.applied). Its blocks before the first patched
one are ordinary nodes, so it shares them with every other configuration: a
map merged before a run shares the blocks up to the one it is merged into, a
magnitude scale every block before the run. A patch of the embeddings (a map
for a run from block 0) changes the stream entering block 0 and is not
shared: run_pass refuses it, and callers measure it on its own.

Peak memory beyond the model: (depth of the tree + 1) hidden states of one
window batch (at most L + 1 tensors of batch x window x width), the attention
temporaries of one block, and one LOGIT_ROWS x VOCAB_SLICE slice of logits;
with ``divergence``, the baseline's probabilities at the batch's scored
positions (scored positions x vocabulary) and one LOGIT_ROWS x vocabulary
chunk of logits (evaluation.divergence).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from utils.log import progress_bar

from evaluation.divergence import compare as divergence_compare
from evaluation.divergence import head_slices, slices_token_nll
from evaluation.divergence import reference as divergence_reference
from evaluation.intervals import block_counts, block_tokens, perplexity_intervals
from evaluation.passfile import PassCheckpoint, PassState, pass_identity
from evaluation.perplexity import LOGIT_ROWS, PerplexityResult, batch_inputs, to_perplexity, token_nll
from evaluation.windows import DEFAULT_PROTOCOL, Window, make_windows, window_batches
from models.compensation import Patch, applied, by_block
from models.families import (block_output, family_of, final_modules, get_blocks, lm_head, module_at,
                             record_block_calls)
from models.placement import input_device
from models.removal import check_units, skipped_sublayer
from models.units import FULL, config_key, kept_nodes

# A node of the prefix tree: a kept block and what of it runs ('block', or only its 'attn' or 'mlp'), and for
# a block with a configuration's patched tensors, a third entry: the index of those tensors in the pass's variants.
Node = tuple


@dataclass
class Work:
    """What a sweep cost, against what one-model-at-a-time evaluation costs.

    A block evaluation is one block applied to one window. FLOPs are model
    FLOPs (Chowdhery et al., 2022, "PaLM", appendix B): 2 per multiply-add of
    the weight matrices, plus the causal attention scores and weighted sums
    (only the query-key pairs the mask allows), plus the LM head on the scored
    positions. Elementwise work (layer norms, GELU, softmax) is not counted.
    """

    configurations: int = 0
    windows: int = 0
    block_evals: int = 0
    naive_block_evals: int = 0
    tokens_scored: int = 0
    flops: float = 0.0
    seconds: float = 0.0  # wall time of the perplexity passes only (no speed test)
    checkpoint_seconds: float = 0.0  # of ``seconds``, writing pass checkpoints (evaluation.passfile)

    def add(self, other: "Work") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds if self.seconds > 0 else 0.0

    @property
    def block_evals_saved(self) -> float:
        """Fraction of the naive block evaluations that sharing avoided."""
        return 1.0 - self.block_evals / self.naive_block_evals if self.naive_block_evals else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "flops_per_s": self.flops_per_s, "block_evals_saved": self.block_evals_saved}

    def summary(self) -> str:
        return (f"{self.configurations} configurations: {self.block_evals:,} block evaluations "
                f"(one-at-a-time: {self.naive_block_evals:,}, {self.block_evals_saved:.0%} saved), "
                f"{self.tokens_scored:,} tokens scored, {self.flops / 1e12:.2f} TFLOP in {self.seconds:.1f} s "
                f"= {self.flops_per_s / 1e9:.1f} GFLOP/s"
                + (f", {self.checkpoint_seconds:.2f} s of it writing checkpoints" if self.checkpoint_seconds else ""))


@dataclass
class _Node:
    """A distinct prefix of kept nodes; ``node`` is its last one: (block, 'block' | 'attn' | 'mlp')."""

    node: Node
    children: dict[Node, "_Node"] = field(default_factory=dict)
    ends: list[int] = field(default_factory=list)  # configurations whose kept list is this prefix


def prefix_tree(kept_lists: Sequence[Sequence[Node]], first: int | None = None) -> _Node:
    """The kept lists as a tree; a plain block index stands for the whole block. Kept list ``first`` goes in
    first, so its path comes first among every node's children (_walk)."""
    root = _Node((-1, FULL))
    order = range(len(kept_lists)) if first is None else [first, *(i for i in range(len(kept_lists)) if i != first)]
    for index in order:
        kept = kept_lists[index]
        node = root
        for item in kept:
            key = (item, FULL) if isinstance(item, int) else tuple(item)
            node = node.children.setdefault(key, _Node(key))
        node.ends.append(index)
    return root


def count_nodes(node: _Node) -> int:
    """Block evaluations per window batch: every node but the root."""
    return len(tree_nodes(node))


def _matmul_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() == 2)


def block_flops(model: nn.Module, window: int, part: str = FULL) -> float:
    """Model FLOPs of one block, or of the one sublayer ``part`` ('attn', 'mlp') of it, on ``window`` tokens."""
    block, family = get_blocks(model)[0], family_of(model)
    width = model.config.hidden_size
    attention = 2.0 * _matmul_params(module_at(block, family.attention)) * window + 4.0 * width * (
        window * (window + 1) // 2)
    mlp = 2.0 * sum(_matmul_params(module_at(block, path)) for path in family.mlp) * window
    full = 2.0 * _matmul_params(block) * window + 4.0 * width * (window * (window + 1) // 2)
    return {FULL: full, "attn": attention, "mlp": mlp}[part]


def head_flops(model: nn.Module, tokens: int) -> float:
    return 2.0 * model.get_output_embeddings().weight.numel() * tokens


class _BatchRunner:
    """Embeds a window batch and runs single blocks exactly as the model's own forward does."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = get_blocks(model)
        self.final = final_modules(model)
        self.head = lm_head(model)
        self.device = input_device(model)
        self.calls: list = []

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden, self.calls = record_block_calls(self.model, inputs.to(self.device))
        return hidden

    def block(self, node: Node, hidden: torch.Tensor, variants: Sequence[Patch] = ()) -> torch.Tensor:
        """The node's block on ``hidden``; a partial node runs the block with its other sublayer skipped, a
        patched one with its configuration's tensors in place (``variants``)."""
        index, part = node[0], node[1]
        block = self.blocks[index]
        with applied(self.model, variants[node[2]] if len(node) > 2 else None):
            if part == FULL:
                return block_output(self.model, self.calls[index](block, hidden))
            with skipped_sublayer(self.model, block, "mlp" if part == "attn" else "attn"):
                return block_output(self.model, self.calls[index](block, hidden))


def _walk(node: _Node, hidden: torch.Tensor, step: Callable[[Node, torch.Tensor], torch.Tensor],
          finish: Callable[[int, torch.Tensor], None]) -> None:
    """Depth first: only the states on the path from the root stay alive. A node's configurations are
    finished after its subtree, so the configuration inserted first into the tree (the baseline, when it is
    the reference) is the first one finished of every window batch."""
    for child in node.children.values():
        _walk(child, step(child.node, hidden), step, finish)
    for config in node.ends:
        finish(config, hidden)


@dataclass(frozen=True)
class PassResult:
    """One configuration's results from a pass. With ``compare`` (run_pass) they hold the 95% intervals of
    the perplexity and of its change in percent against the baseline (evaluation.intervals), and with
    ``divergence`` the mean KL(original || pruned) and the share of scored positions whose top-1 token is
    the original's (evaluation.divergence)."""

    ppl: PerplexityResult
    kld: float | None = None
    top1_agreement: float | None = None
    ppl_interval: tuple[float, float] | None = None
    change_interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class _Plan:
    """What a pass evaluates, fixed for its whole length."""

    configs: list[tuple]  # canonical removal sets; the baseline appended when it is the reference and missing
    kept_lists: list[tuple[Node, ...]]
    tree: _Node
    windows: list[Window]
    offsets: list[int]  # scored tokens before each window
    block: int  # scored tokens per interval block
    reference: int | None  # the baseline's index, when the pass compares against it
    keys: list[str]  # each configuration's key (models.units.config_key), the pass's identity
    variants: list[Patch]  # the patched blocks' tensors, by the index their nodes carry


def patched_nodes(model: nn.Module, kept: Sequence[Node], patch: Patch | None,
                  variants: list[Patch]) -> tuple[Node, ...]:
    """``kept`` with each block whose tensors ``patch`` replaces made a node of its own (appended to
    ``variants``); refuses a patch of anything outside the blocks."""
    if patch is None or not patch.replacements:
        return tuple(kept)
    owned = by_block(model, patch)
    if None in owned:
        raise ValueError("a patch of the embeddings changes the stream entering block 0; measure it on its own")
    out = []
    for node in kept:
        if node[0] in owned:
            variants.append(Patch(patch.method, patch.removal, replacements=tuple(owned[node[0]])))
            node = (node[0], node[1], len(variants) - 1)
        out.append(node)
    return tuple(out)


def _plan(model: nn.Module, removals: Sequence[Sequence], windows: list[Window], compare: bool,
          patches: Sequence[Patch | None] | None) -> _Plan:
    configs = [check_units(model, removed) for removed in removals]
    patches = list(patches or [None] * len(configs))
    if compare and () not in [c for c, p in zip(configs, patches) if p is None]:
        configs.append(())
        patches.append(None)
    reference = next((i for i, (c, p) in enumerate(zip(configs, patches)) if c == () and p is None), None) \
        if compare else None
    n_blocks, variants = len(get_blocks(model)), []
    kept_lists = [patched_nodes(model, kept_nodes(n_blocks, removed), patch, variants)
                  for removed, patch in zip(configs, patches)]
    keys = [config_key(c, p.method if p is not None else None) for c, p in zip(configs, patches)]
    offsets = [0]
    for w in windows:
        offsets.append(offsets[-1] + w.scored)
    return _Plan(configs, kept_lists, prefix_tree(kept_lists, first=reference), windows, offsets,
                 block_tokens(offsets[-1]), reference, keys, variants)


class _Scorer:
    """The LM head and loss of every configuration on one window batch, added into the pass's state.

    With ``divergence`` the baseline's distribution at the batch's scored positions is kept (as
    evaluation.divergence.Reference chunks) from its finish, the batch's first, to the batch's end.
    """

    def __init__(self, runner: _BatchRunner, plan: _Plan, state: PassState, first_window: int, rows: torch.Tensor,
                 positions: torch.Tensor, targets: torch.Tensor, divergence: bool):
        device = runner.device
        self.runner, self.plan, self.state, self.divergence = runner, plan, state, divergence
        self.rows, self.positions, self.targets = rows.to(device), positions.to(device), targets.to(device)
        self.blocks = (plan.offsets[first_window] + torch.arange(len(targets))) // plan.block
        self.references: list = []

    def finish(self, config: int, hidden: torch.Tensor) -> None:
        for module in self.runner.final:
            hidden = module(hidden)
        picked = hidden[self.rows, self.positions]
        total, kl, agree = 0.0, 0.0, 0
        for k, start in enumerate(range(0, len(self.targets), LOGIT_ROWS)):
            rows, targets = picked[start : start + LOGIT_ROWS], self.targets[start : start + LOGIT_ROWS]
            nll, chunk_kl, chunk_agree = self._chunk(config, k, rows, targets)
            total += nll.double().sum().item()  # as evaluation.perplexity.scored_nll adds it up
            kl, agree = kl + chunk_kl, agree + chunk_agree
            self.state.blocks[config].index_add_(0, self.blocks[start : start + LOGIT_ROWS], nll.double().cpu())
        s = self.state
        s.nll[config], s.tokens[config] = s.nll[config] + total, s.tokens[config] + len(self.targets)
        s.kl[config], s.agree[config] = s.kl[config] + kl, s.agree[config] + agree

    def _chunk(self, config: int, k: int, rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        head = self.runner.head
        if not self.divergence:
            return token_nll(head, rows, targets), 0.0, 0
        slices = head_slices(head, rows)
        nll, lse = slices_token_nll(head, slices, targets)
        if config == self.plan.reference:
            self.references.append(divergence_reference(slices, lse))
            return nll, 0.0, len(targets)
        kl, same = divergence_compare(self.references[k], slices, lse)
        return nll, kl.double().sum().item(), int(same.sum().item())


# Test hook (tests/test_passes.py): SIGKILL this process once a pass has this many windows done (after the
# checkpoint tick of that window batch), so a test can stop a run mid-pass at a known point.
KILL_AFTER_WINDOWS = "PRUNING_KIT_KILL_AFTER_WINDOWS"


def _test_kill(done: int) -> None:
    after = os.environ.get(KILL_AFTER_WINDOWS)
    if after and done >= int(after):
        os.kill(os.getpid(), signal.SIGKILL)


def _progress(model: nn.Module, plan: _Plan, batches: list[list[Window]], desc: str, progress: bool):
    """A bar over the model FLOPs still to run, so that it moves block by block within a window batch."""
    nodes = tree_nodes(plan.tree)
    total = sum(len(b) * nodes_flops(model, nodes, b[0].length) + len(plan.configs) * head_flops(
        model, sum(w.scored for w in b)) for b in batches)
    return progress_bar(total=total, desc=desc, unit="FLOP", unit_scale=True, leave=False, disable=not progress)


@torch.no_grad()
def run_pass(model: nn.Module, ids: torch.Tensor, removals: Sequence[Sequence], max_length: int, stride: int | None,
             batch_size: int = 1, progress: bool = True, desc: str = "windows", protocol: str = DEFAULT_PROTOCOL,
             prefix_token: int | None = None, compare: bool = False, divergence: bool = False,
             checkpoint: PassCheckpoint | None = None,
             patches: Sequence[Patch | None] | None = None) -> tuple[list[PassResult], Work]:
    """Every removal set (of blocks and sublayers, models.units) on ``ids``, in one pass over the windows of
    ``protocol`` (evaluation.windows.make_windows); results in the order of ``removals``. ``patches``, one
    per removal set (None: plain), carry the patched configurations' tensors (see the module docstring).

    ``compare``: the baseline runs too (if it is not among ``removals``) and the results hold intervals;
    ``divergence`` (with ``compare``): KL and top-1 agreement against it. ``checkpoint``: the pass continues
    from the state saved there, if any, and saves its own (evaluation.passfile).
    """
    windows = make_windows(len(ids), max_length, stride, protocol, prefix_token)
    plan = _plan(model, removals, windows, compare, patches)
    divergence = divergence and compare
    identity = pass_identity(model, ids, windows, plan.keys, batch_size,
                             {"interval_block": plan.block, "divergence": divergence})
    state = (checkpoint.load(identity) if checkpoint else None) or PassState.fresh(
        identity, len(windows), len(plan.configs), len(block_counts(plan.offsets[-1], plan.block)))
    batches = list(window_batches(windows[state.done:], batch_size))
    runner = _BatchRunner(model)
    work = Work(configurations=len(removals))
    bar = _progress(model, plan, batches, desc, progress)
    saving = checkpoint.seconds if checkpoint else 0.0
    if checkpoint:
        checkpoint.start(state)
    start = time.perf_counter()
    for batch in batches:
        _run_batch(runner, plan, state, ids, batch, divergence, bar)
        state.done += len(batch)
        _account(work, model, batch, plan.tree, plan.kept_lists, sum(w.scored for w in batch))
        bar.set_postfix_str(f"{state.done}/{len(windows)} windows", refresh=False)
        if checkpoint:
            checkpoint.tick(state)
        _test_kill(state.done)
    if checkpoint and batches:
        checkpoint.save(state)  # the results outlive the pass until their rows are written
    bar.close()
    work.seconds = time.perf_counter() - start
    work.checkpoint_seconds = checkpoint.seconds - saving if checkpoint else 0.0
    return _results(plan, state, compare, divergence)[: len(removals)], work


def _run_batch(runner: _BatchRunner, plan: _Plan, state: PassState, ids: torch.Tensor, batch: list[Window],
               divergence: bool, bar) -> None:
    inputs, rows, positions, targets = batch_inputs(ids, batch)
    scorer = _Scorer(runner, plan, state, state.done, rows, positions, targets, divergence)
    window = batch[0].length
    part_flops = {part: len(batch) * block_flops(runner.model, window, part) for part in (FULL, "attn", "mlp")}
    finish_flops = head_flops(runner.model, len(targets))

    def step(node: Node, hidden: torch.Tensor) -> torch.Tensor:
        out = runner.block(node, hidden, plan.variants)
        bar.update(part_flops[node[1]])
        return out

    def finish(config: int, hidden: torch.Tensor) -> None:
        scorer.finish(config, hidden)
        bar.update(finish_flops)

    _walk(plan.tree, runner.embed(inputs), step, finish)


def _results(plan: _Plan, state: PassState, compare: bool, divergence: bool) -> list[PassResult]:
    intervals = (perplexity_intervals(state.blocks, block_counts(plan.offsets[-1], plan.block), plan.reference)
                 if compare else [(None, None)] * len(plan.configs))
    out = []
    for c, (ppl_interval, change_interval) in enumerate(intervals):
        nll, tokens = state.nll[c], state.tokens[c]
        out.append(PassResult(PerplexityResult(to_perplexity(nll, tokens), nll, tokens),
                              state.kl[c] / tokens if divergence else None,
                              state.agree[c] / tokens if divergence else None, ppl_interval, change_interval))
    return out


def sweep_perplexities(model: nn.Module, ids: torch.Tensor, removals: Sequence[Sequence[int]], max_length: int,
                       stride: int | None, batch_size: int = 1, progress: bool = True, desc: str = "windows",
                       protocol: str = DEFAULT_PROTOCOL, prefix_token: int | None = None,
                       patches: Sequence[Patch | None] | None = None) -> tuple[list[PerplexityResult], Work]:
    """Perplexity of every removal set on ``ids`` in one pass (run_pass without comparisons or checkpoint)."""
    results, work = run_pass(model, ids, removals, max_length, stride, batch_size, progress, desc, protocol,
                             prefix_token, patches=patches)
    return [r.ppl for r in results], work


def tree_nodes(node: _Node) -> list[Node]:
    """Every node of the tree but the root (one block evaluation each per window)."""
    return [n for child in node.children.values() for n in (child.node, *tree_nodes(child))]


def nodes_flops(model: nn.Module, nodes: Sequence[Node], window: int) -> float:
    per_part = {part: block_flops(model, window, part) for part in {n[1] for n in nodes}}
    return sum(per_part[n[1]] for n in nodes)


def _account(work: Work, model: nn.Module, batch: Sequence[Window], tree: _Node,
             kept_lists: Sequence[Sequence[Node]], scored: int) -> None:
    nodes = tree_nodes(tree)
    window = batch[0].length  # a batch's windows have one length
    work.windows += len(batch)
    work.block_evals += len(nodes) * len(batch)
    work.naive_block_evals += sum(len(k) for k in kept_lists) * len(batch)
    work.tokens_scored += scored * len(kept_lists)
    work.flops += len(batch) * nodes_flops(model, nodes, window) + len(kept_lists) * head_flops(model, scored)


def one_model_work(model: nn.Module, windows: Sequence[Window], removed: Sequence, seconds: float) -> Work:
    """The Work of evaluating one pruned model on its own (no sharing) over ``windows``."""
    kept = kept_nodes(len(get_blocks(model)), removed)
    scored = sum(w.scored for w in windows)
    flops = sum(nodes_flops(model, kept, w.length) for w in windows) + head_flops(model, scored)
    return Work(1, len(windows), len(kept) * len(windows), len(kept) * len(windows), scored, flops, seconds)
