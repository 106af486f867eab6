"""Seconds per healing step for a distilgpt2-shaped model (random weights: step time does not depend on them).

    python benchmarks/heal_step_time.py --steps 5 --batch-size 4 --seq-len 256

Works offline; the numbers size --heal-steps on a given machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import HealSpec  # noqa: E402
from export.heal import heal  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--remove", default="3", help="blocks removed before healing, e.g. 2,3")
    args = p.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    train_ids = torch.randint(0, config.vocab_size, (20_000,))
    removed = [int(i) for i in args.remove.split(",")]
    print(f"{torch.get_num_threads()} threads; {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"blocks {removed} removed")
    for mode, kd in (("lora", False), ("lora", True), ("full", False), ("full", True)):
        settings = HealSpec(steps=args.steps + 1, mode=mode, kd=kd, batch_size=args.batch_size, seq_len=args.seq_len)
        start = time.perf_counter()
        heal(model, removed, train_ids, settings, progress=False)
        seconds = time.perf_counter() - start
        print(f"{mode:4s} kd={str(kd):5s} {seconds / settings.steps:6.2f} s/step (incl. copy and merge)")


if __name__ == "__main__":
    main()
