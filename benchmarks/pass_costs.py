"""What a results pass's extras cost: KL / top-1 agreement, checkpoints and intervals.

A sequential sweep (the baseline and every single block removed) of a random-
weight model of distilgpt2's shape (the kit's default model: 6 blocks, 768
wide, vocabulary 50,257, where the LM head is a large share of a pass) is
evaluated by evaluation.engine.run_pass in alternating rounds, with and
without ``divergence``; the faster round of each kind is kept. On a shared
machine the two kinds' times move with the load, so the rounds with
``divergence`` also time the KL and top-1 computation itself (the
evaluation.divergence calls) as a share of the same pass, which a change of
load between rounds does not move. The checkpoint's cost is its
writing time in the rounds that checkpoint (Work.checkpoint_seconds) and the
time of one save of the state of a full WikiText-2 pass of 64 configurations
(2,248 interval blocks); the intervals' cost is their computation for that
state. Not part of the test suite; see docs/passes.md.

    python benchmarks/pass_costs.py [--tokens 2048] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import engine  # noqa: E402
from evaluation.engine import run_pass  # noqa: E402
from evaluation.intervals import block_counts, block_tokens, perplexity_intervals  # noqa: E402
from evaluation.passfile import PassCheckpoint, PassState  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

WIKITEXT_TOKENS = 287_644  # GPT-2 tokens of the WikiText-2 test split (shared/data/README.md)


def model(n_layer: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    return GPT2LMHeadModel(config).eval()


def timed(name: str, spent: list[float]) -> None:
    """Replace engine.<name> by itself plus a timer adding to spent[0]."""
    real = getattr(engine, name)

    def wrapper(*args):
        start = time.perf_counter()
        out = real(*args)
        spent[0] += time.perf_counter() - start
        return out

    setattr(engine, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = model(args.layers)
    ids = torch.randint(0, 50257, (args.tokens,), generator=torch.Generator().manual_seed(0))
    removals = [(), *((i,) for i in range(args.layers))]
    run = lambda kl, checkpoint=None: run_pass(m, ids, removals, args.max_length, args.stride, progress=False,
                                               compare=True, divergence=kl, checkpoint=checkpoint)
    run(True)  # warm-up
    spent = [0.0]
    timed("divergence_reference", spent)
    timed("divergence_compare", spent)
    best = {False: float("inf"), True: float("inf")}
    saving, shares = [], []
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for kl in (False, True):
                checkpoint = PassCheckpoint(f"{folder}/p{r}{kl}.pt")
                spent[0] = 0.0
                _, work = run(kl, checkpoint)
                if kl:
                    shares.append(spent[0] / work.seconds)
                best[kl] = min(best[kl], work.seconds)
                saving.append((work.checkpoint_seconds, work.seconds, checkpoint.saves))
        n_blocks = len(block_counts(WIKITEXT_TOKENS, block_tokens(WIKITEXT_TOKENS)))
        state = PassState.fresh({"configurations": ["x"] * 64}, 562, 64, n_blocks)
        state.blocks.normal_()
        big = PassCheckpoint(f"{folder}/big.pt")
        for _ in range(5):
            big.save(state)
        start = time.perf_counter()
        perplexity_intervals(state.blocks.abs() + 300.0, block_counts(WIKITEXT_TOKENS, 128), 0)
        intervals_s = time.perf_counter() - start
    print(f"{args.layers} blocks x 768, vocabulary 50257, sequential sweep ({len(removals)} configurations), "
          f"{args.tokens} tokens, max length {args.max_length}, stride {args.stride}, {args.threads} threads")
    print(f"  pass without KL: {best[False]:.1f} s; with KL and top-1: {best[True]:.1f} s "
          f"(+{(best[True] / best[False] - 1) * 100:.1f}%)")
    print(f"  KL and top-1 computation within the passes with them: "
          f"{', '.join(f'{x * 100:.1f}%' for x in shares)} of the pass")
    for seconds, total, saves in saving:
        print(f"  checkpoints: {saves} saves, {seconds * 1000:.1f} ms of a {total:.1f} s pass "
              f"({seconds / total * 100:.2f}%)")
    print(f"  one save of a full WikiText-2 pass's state (64 configurations x {n_blocks} blocks): "
          f"{big.seconds / big.saves * 1000:.1f} ms; its intervals: {intervals_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
