"""The searches at the depth users prune, on a real checkpoint: greedy, raced greedy, beam and evolve.

For each k, every search chooses k blocks on calibration tokens, each with a
fresh calibration cache (so its wall time and cost are its own); then every
chosen set is evaluated on held-out tokens in one shared-prefix pass. Prints
a markdown table: calibration and evaluation perplexity, what choosing cost
(sets, tokens, block evaluations) and wall time.

    python benchmarks/search_real.py --model /tmp/smollm2 --k 3,7

The model is a plain folder (config + weights + tokenizer); --gguf DIR/FILE
loads a GGUF checkpoint (SmolLM2-135M-Instruct.Q4_1.gguf) and saves it as
such a folder first. The text is WikiText-2's test split from
../shared/data; calibration takes the tokens after the evaluated ones, as the
kit does for a local file. Skips with a message when an input is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wiki.test.raw"


def plain_folder(gguf: str, out: str) -> str:
    """The GGUF checkpoint, dequantized, saved as a plain folder from its config and state dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = type(loaded)(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="plain model folder")
    p.add_argument("--gguf", help="GGUF file to convert into --model first")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--k", default="3,7")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--calib-tokens", type=int, default=1024)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--protocol", default="disjoint")
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--beam-width", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--searches", default="greedy,greedy-race,beam,evolve", help="which of greedy, greedy-race, "
                   "beam, evolve")
    args = p.parse_args()
    if args.gguf and not os.path.exists(args.gguf):
        print(f"skipped: no GGUF file at {args.gguf}")
        return 0
    if not os.path.exists(args.text):
        print(f"skipped: no text at {args.text}")
        return 0
    if args.gguf and not (args.model and os.path.exists(os.path.join(args.model, "config.json"))):
        args.model = plain_folder(args.gguf, args.model or "/tmp/search_real_model")
    if not args.model or not os.path.exists(os.path.join(args.model, "config.json")):
        print("skipped: give --model DIR (a plain folder) or --gguf FILE")
        return 0

    import torch

    from config import SelectSpec
    from evaluation.engine import sweep_perplexities
    from models.loading import load_model
    from models.units import removed_label
    from pruning.calibration import Calibration
    from pruning.picks import picks
    from utils.data import tokenize

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, torch.device("cpu"), "float32")
    text = Path(args.text).read_text(encoding="utf-8")
    ids = tokenize(tokenizer, text[: (args.eval_tokens + args.calib_tokens) * 8])
    eval_ids, calib_ids = ids[: args.eval_tokens], ids[args.eval_tokens : args.eval_tokens + args.calib_tokens]
    window = dict(max_length=args.max_length, stride=None, protocol=args.protocol)
    base = SelectSpec(generations=args.generations, offspring=args.offspring, beam_width=args.beam_width)
    known = {"greedy": ("greedy", base), "greedy-race": ("greedy", replace(base, race=True)),
             "beam": ("beam", base), "evolve": ("evolve", base)}
    searches = [known[name] for name in args.searches.split(",")]
    print(f"{args.model}: {len(eval_ids):,} evaluation and {len(calib_ids):,} calibration tokens of {args.text}, "
          f"windows of {args.max_length} ({args.protocol}), {args.threads} threads")
    for k in (int(x) for x in args.k.split(",")):
        found = []
        for name, select in searches:
            calib = Calibration(model, lambda: calib_ids, progress=False, **window)
            start = time.perf_counter()
            pick = picks(name, calib, select, k, only=[k])[k]
            seconds = time.perf_counter() - start
            label = f"{name}{' --race' if select.race else ''}" + (f" (width {select.beam_width})"
                                                                    if name == "beam" else "")
            found.append((label, pick, seconds))
            print(f"  k={k} {label}: {removed_label(pick.removal)} in {seconds:.0f} s", flush=True)
        results, _ = sweep_perplexities(model, eval_ids, [(), *(p.removal for _, p, _ in found)], progress=False,
                                        **window)
        print(f"\nk = {k} (baseline evaluation PPL {results[0].perplexity:.2f})\n")
        print("| Search | Removed | Calibration PPL | Evaluation PPL | Sets | Tokens | Block evals | Wall (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for (label, pick, seconds), r in zip(found, results[1:]):
            c = pick.cost
            print(f"| {label} | {removed_label(pick.removal)} | {pick.step.score:.2f} | {r.perplexity:.2f} | "
                  f"{c.evaluations:,} | {c.tokens:,} | {c.block_evals:,} | {seconds:.0f} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
