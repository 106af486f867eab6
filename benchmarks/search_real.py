"""The rules and searches at the depth users prune, on a real checkpoint: bi, angular, ppl, greedy,
raced greedy, beam and evolve.

For each k, every rule and search chooses k blocks on calibration tokens,
each with a fresh calibration cache (so its wall time and cost are its own);
then every chosen set is evaluated on held-out tokens in one shared-prefix
pass, plain and, with --patch, patched by each method (fitted on the
calibration tokens). Prints a markdown table: calibration and evaluation
perplexity, what choosing cost (sets, tokens, block evaluations) and wall
time. --exhaustive also scores every k-subset on the calibration tokens and
reports each pick's rank among them and the calibration optimum; --slices N
chooses again on N disjoint slices of the calibration tokens and reports how
the picks overlap (pruning.stability).

    python benchmarks/search_real.py --model /tmp/smollm2 --k 3 --exhaustive --patch --slices 2

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
    p.add_argument("--searches", default="bi,angular,ppl,greedy,greedy-race,beam,evolve",
                   help="which of bi, angular, ppl, greedy, greedy-race, beam, evolve, and greedy+METHOD (greedy "
                   "with every candidate patched by --patch METHOD, as --choose-patched)")
    p.add_argument("--exhaustive", action="store_true", help="score every k-subset on the calibration tokens")
    p.add_argument("--patch", action="store_true", help="evaluate each pick patched by every --patch method too")
    p.add_argument("--slices", type=int, default=1, help="choose again on N disjoint calibration slices")
    p.add_argument("--evaluate", help="only evaluate these sets ('5,16,17;14,17,25'), plain and patched by each of "
                   "--methods fitted on the --calib-tokens after the evaluated ones; no choosing")
    p.add_argument("--methods", default="lstsq,cosine,magnitude")
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

    from itertools import combinations
    from math import comb

    from config import SelectSpec
    from evaluation.engine import sweep_perplexities
    from models.loading import load_model
    from models.units import removed_label
    from pruning.calibration import Calibration
    from evaluation.perplexity import perplexity
    from models.compensation import applied
    from models.removal import removed_blocks
    from pruning.compensation import METHODS, fit_patch, touches_embeddings
    from pruning.picks import picks
    from pruning.stability import held
    from utils.data import tokenize

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, torch.device("cpu"), "float32")
    text = Path(args.text).read_text(encoding="utf-8")
    ids = tokenize(tokenizer, text[: (args.eval_tokens + args.calib_tokens) * 8])
    eval_ids, calib_ids = ids[: args.eval_tokens], ids[args.eval_tokens : args.eval_tokens + args.calib_tokens]
    window = dict(max_length=args.max_length, stride=None, protocol=args.protocol)
    if args.evaluate:
        sets = [tuple(int(b) for b in part.split(",")) for part in args.evaluate.split(";")]
        methods = args.methods.split(",")
        base_ppl = sweep_perplexities(model, eval_ids, [()], progress=False, **window)[0][0].perplexity
        print(f"baseline evaluation PPL {base_ppl:.2f}; fits on {len(calib_ids):,} tokens\n")
        print("| Removed | Plain | " + " | ".join(f"+{m} (fit s)" for m in methods) + " |\n|" + "---|" * (2 + len(methods)))
        for removed in sets:
            cells = [f"{sweep_perplexities(model, eval_ids, [removed], progress=False, **window)[0][0].perplexity:.2f}"]
            for method in methods:
                fit = fit_patch(model, removed, method, calib_ids, args.max_length, progress=False)
                with removed_blocks(model, removed) as pruned, applied(pruned, fit):
                    value = perplexity(pruned, eval_ids, args.max_length, None, progress=False,
                                       protocol=args.protocol).perplexity
                cells.append(f"{value:.2f} ({sum(m.info['seconds'] for m in fit.maps):.1f})")
            print(f"| {removed_label(removed)} | " + " | ".join(cells) + " |", flush=True)
        return 0
    base = SelectSpec(generations=args.generations, offspring=args.offspring, beam_width=args.beam_width)
    known = {"bi": ("bi", base), "angular": ("angular", base), "ppl": ("ppl", base),
             "greedy": ("greedy", base), "greedy-race": ("greedy", replace(base, race=True)),
             "beam": ("beam", base), "evolve": ("evolve", base)}
    known.update({f"greedy+{m}": ("greedy", base) for m in ("lstsq", "cosine", "magnitude")})
    searches = [(*known[name], name.partition("+")[2] or "none") for name in args.searches.split(",")]
    print(f"{args.model}: {len(eval_ids):,} evaluation and {len(calib_ids):,} calibration tokens of {args.text}, "
          f"windows of {args.max_length} ({args.protocol}), {args.threads} threads")
    for k in (int(x) for x in args.k.split(",")):
        found = []
        for name, select, patch in searches:
            calib = Calibration(model, lambda: calib_ids, progress=False, patch=patch, **window)
            start = time.perf_counter()
            pick = picks(name, calib, select, k, only=[k])[k]
            seconds = time.perf_counter() - start
            label = f"{name}{' --race' if select.race else ''}" + (f" (width {select.beam_width})"
                                                                    if name == "beam" else "") + (
                f" --choose-patched ({patch})" if patch != "none" else "")
            found.append((label, pick, seconds))
            print(f"  k={k} {label}: {removed_label(pick.removal)} in {seconds:.0f} s ({pick.cost})", flush=True)
        calib = Calibration(model, lambda: calib_ids, progress=False, **window)
        on_calib = calib.perplexities([p.removal for _, p, _ in found])
        removals = [(), *(p.removal for _, p, _ in found)]
        results, _ = sweep_perplexities(model, eval_ids, removals, progress=False, **window)
        patched = {}
        if args.patch:
            for method in METHODS:
                fits = [fit_patch(model, r, method, calib_ids, args.max_length, progress=False) for r in removals[1:]]
                shared = [i for i, f in enumerate(fits) if not touches_embeddings(model, f)]
                got, _ = sweep_perplexities(model, eval_ids, [removals[1 + i] for i in shared], progress=False,
                                            patches=[fits[i] for i in shared], **window)
                patched[method] = {shared[j]: g.perplexity for j, g in enumerate(got)}
                for i in set(range(len(fits))) - set(shared):  # a map into the embeddings: on its own
                    with removed_blocks(model, removals[1 + i]) as pruned, applied(pruned, fits[i]):
                        patched[method][i] = perplexity(pruned, eval_ids, args.max_length, None, progress=False,
                                                        protocol=args.protocol).perplexity
                patched[method + "_s"] = sum(m.info["seconds"] for f in fits for m in f.maps)
        print(f"\nk = {k} (baseline evaluation PPL {results[0].perplexity:.2f})\n")
        heads = ["Rule / search", "Removed", "Calibration PPL", "Evaluation PPL",
                 *(f"+{m}" for m in METHODS if args.patch), "Sets", "Tokens", "Block evals", "Wall (s)"]
        print("| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
        for i, ((label, pick, seconds), r, c_ppl) in enumerate(zip(found, results[1:], on_calib)):
            c = pick.cost
            cells = [label, removed_label(pick.removal), f"{c_ppl:.2f}", f"{r.perplexity:.2f}",
                     *(f"{patched[m][i]:.2f}" for m in METHODS if args.patch),
                     f"{c.evaluations:,}", f"{c.tokens:,}", f"{c.block_evals:,}", f"{seconds:.0f}"]
            print("| " + " | ".join(cells) + " |")
        if args.patch:
            print("\nfit seconds (all picks): " + ", ".join(f"{m} {patched[m + '_s']:.1f}" for m in METHODS))
        if args.exhaustive:
            every = list(combinations(range(calib.n_blocks), k))
            start = time.perf_counter()
            scores = []
            for g in range(0, len(every), 512):
                scores += calib.perplexities(every[g : g + 512])
                print(f"  exhaustive: {len(scores):,} of {comb(calib.n_blocks, k):,} sets "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            order = sorted(range(len(every)), key=lambda i: (scores[i], every[i]))
            best = every[order[0]]
            rank = {every[i]: n + 1 for n, i in enumerate(order)}
            best_eval, _ = sweep_perplexities(model, eval_ids, [best], progress=False, **window)
            print(f"\nexhaustive: {len(every):,} sets on the calibration tokens in {time.perf_counter() - start:.0f} s; "
                  f"optimum {removed_label(best)} at calibration PPL {scores[order[0]]:.2f}, evaluation PPL "
                  f"{best_eval[0].perplexity:.2f}")
            for label, pick, _ in found:
                print(f"  {label}: rank {rank[tuple(pick.removal)]:,} of {len(every):,}")
        if args.slices > 1:
            rows = held(calib, replace(base, calib_slices=args.slices),
                        list(dict.fromkeys(n for n, _, p in searches if p == "none")), k, only=[k])
            print(f"\nslices: {args.slices} disjoint slices of {len(calib_ids) // args.slices:,} tokens\n")
            print("| Rule / search | Picks per slice | Mean Jaccard | Calibration PPL spread (%) |\n|---|---|---|---|")
            for h in rows:
                print(f"| {h.name} | {'; '.join(removed_label(p) for p in h.picks)} | {h.jaccard:.2f} | "
                      f"{h.spread:.2f} |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
