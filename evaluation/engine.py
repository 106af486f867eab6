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
evaluation.perplexity.scored_nll, so each perplexity equals the one-model-at-
a-time evaluation of evaluation.perplexity.perplexity to the last bit on a given
device and batch size.

Removal sets may hold sublayers (models.units): a node of the tree is then a
(block, part) pair, part 'block' for the whole block or 'attn' / 'mlp' for a
block that keeps only that sublayer. A partial node is one call of the real
block with its other sublayer replaced by the stub removed_units uses
(models.removal.skipped_sublayer), so it is exact for sequential and
parallel-residual blocks alike, and sweeps over units share prefixes too.

Peak memory beyond the model: (depth of the tree + 1) hidden states of one
window batch (at most L + 1 tensors of batch x window x width), the attention
temporaries of one block, and one LOGIT_ROWS x VOCAB_SLICE slice of logits.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from utils.log import progress_bar

from evaluation.perplexity import PerplexityResult, batch_inputs, scored_nll, to_perplexity
from evaluation.windows import DEFAULT_PROTOCOL, Window, make_windows, window_batches
from models.families import (block_output, family_of, final_modules, get_blocks, lm_head, module_at,
                             record_block_calls)
from models.placement import input_device
from models.removal import check_units, skipped_sublayer
from models.units import FULL, kept_nodes

# A node of the prefix tree: a kept block and what of it runs ('block', or only its 'attn' or 'mlp').
Node = tuple[int, str]


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
                f"= {self.flops_per_s / 1e9:.1f} GFLOP/s")


@dataclass
class _Node:
    """A distinct prefix of kept nodes; ``node`` is its last one: (block, 'block' | 'attn' | 'mlp')."""

    node: Node
    children: dict[Node, "_Node"] = field(default_factory=dict)
    ends: list[int] = field(default_factory=list)  # configurations whose kept list is this prefix


def prefix_tree(kept_lists: Sequence[Sequence[Node]]) -> _Node:
    """The kept lists as a tree; a plain block index stands for the whole block."""
    root = _Node((-1, FULL))
    for index, kept in enumerate(kept_lists):
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

    def block(self, node: Node, hidden: torch.Tensor) -> torch.Tensor:
        """The node's block on ``hidden``; a partial node runs the block with its other sublayer skipped."""
        index, part = node
        block = self.blocks[index]
        if part == FULL:
            return block_output(self.model, self.calls[index](block, hidden))
        with skipped_sublayer(self.model, block, "mlp" if part == "attn" else "attn"):
            return block_output(self.model, self.calls[index](block, hidden))

    def nll(self, hidden: torch.Tensor, rows, positions, targets) -> float:
        for module in self.final:
            hidden = module(hidden)
        return scored_nll(self.head, hidden, rows, positions, targets)


def _walk(node: _Node, hidden: torch.Tensor, step: Callable[[Node, torch.Tensor], torch.Tensor],
          finish: Callable[[int, torch.Tensor], None]) -> None:
    """Depth first: only the states on the path from the root stay alive."""
    for config in node.ends:
        finish(config, hidden)
    for child in node.children.values():
        _walk(child, step(child.node, hidden), step, finish)


@torch.no_grad()
def sweep_perplexities(model: nn.Module, ids: torch.Tensor, removals: Sequence[Sequence[int]], max_length: int,
                       stride: int | None, batch_size: int = 1, progress: bool = True, desc: str = "windows",
                       protocol: str = DEFAULT_PROTOCOL,
                       prefix_token: int | None = None) -> tuple[list[PerplexityResult], Work]:
    """Perplexity of every removal set (of blocks and sublayers, models.units) on ``ids``, in one pass over
    the windows of ``protocol`` (evaluation.windows.make_windows).

    Results are in the order of ``removals``.
    """
    n_blocks = len(get_blocks(model))
    kept_lists = [kept_nodes(n_blocks, check_units(model, removed)) for removed in removals]
    tree = prefix_tree(kept_lists)
    runner = _BatchRunner(model)
    windows = make_windows(len(ids), max_length, stride, protocol, prefix_token)
    nll = [0.0] * len(kept_lists)
    tokens = [0] * len(kept_lists)
    work = Work(configurations=len(kept_lists))
    bar = progress_bar(total=len(windows), desc=desc, unit="win", leave=False, disable=not progress)
    start = time.perf_counter()
    for batch in window_batches(windows, batch_size):
        inputs, rows, positions, targets = batch_inputs(ids, batch)
        hidden = runner.embed(inputs)

        def finish(config: int, state: torch.Tensor) -> None:
            nll[config] += runner.nll(state, rows, positions, targets)
            tokens[config] += len(targets)

        _walk(tree, hidden, runner.block, finish)
        _account(work, model, batch, tree, kept_lists, len(targets))
        bar.update(len(batch))
    bar.close()
    work.seconds = time.perf_counter() - start
    return [PerplexityResult(to_perplexity(n, t), n, t) for n, t in zip(nll, tokens)], work


def tree_nodes(node: _Node) -> list[Node]:
    """Every node of the tree but the root (one block evaluation each per window)."""
    return [n for child in node.children.values() for n in (child.node, *tree_nodes(child))]


def nodes_flops(model: nn.Module, nodes: Sequence[Node], window: int) -> float:
    per_part = {part: block_flops(model, window, part) for part in {p for _, p in nodes}}
    return sum(per_part[part] for _, part in nodes)


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
