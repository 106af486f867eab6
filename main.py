"""gpt2-pruning-kit command line: parse, validate, dispatch."""

from __future__ import annotations

import argparse
import sys

from pruning.choosers import CHOOSERS
from pruning.importance import METRICS
from pruning.strategies import PLANNERS
from utils.distributed import Shard, parse_shard
from utils.errors import KitError

MERGE = "merge"
# Modes that read results CSVs instead of evaluating a model.
CSV_MODES = ("report", MERGE)


class Parser(argparse.ArgumentParser):
    """Bad arguments give one line and exit status 2, like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def removal_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices such as 1,3, got '{text}'")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got '{text}'")
    return value


def shard_spec(text: str) -> Shard:
    try:
        return parse_shard(text)
    except KitError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="main.py", description="Remove transformer blocks from a GPT-2 model and measure "
               "perplexity, latency and size.")
    p.add_argument("--mode", required=True, choices=sorted([*PLANNERS, *CHOOSERS, *CSV_MODES]),
                   help="what to evaluate; report: figures and report.md again from --input; "
                        "merge: join the results files of --shard runs")

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="distilgpt2", help="Hub id or local directory (default: distilgpt2)")
    g.add_argument("--dataset", default="wikitext-2-raw-v1",
                   help="Hub dataset (wikitext-2-raw-v1, or ID[:CONFIG]) or a local .txt/.json/.jsonl/.csv/.parquet file")
    g.add_argument("--split", default="test", help="Hub dataset split (default: test)")
    g.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto: float32 on CPU, the checkpoint's dtype elsewhere")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--cache-dir", help="where tokenized datasets are cached (default: ~/.cache/gpt2-pruning-kit)")
    g.add_argument("--no-cache", action="store_true", help="tokenize the dataset afresh and cache nothing")

    g = p.add_argument_group("perplexity")
    g.add_argument("--max-length", type=positive_int, help="window length (default: the model's context size)")
    g.add_argument("--stride", type=positive_int, help="window step (default: 512, or half of --max-length if smaller)")
    g.add_argument("--max-tokens", type=positive_int, help="evaluate only the first N tokens (default: all)")
    g.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default: 1)")

    g = p.add_argument_group("which blocks")
    g.add_argument("--remove", type=removal_list, help="custom mode: blocks to remove, e.g. 1,3")
    g.add_argument("--min-remove", type=positive_int, default=2, help="combinatorial: fewest blocks removed (default 2)")
    g.add_argument("--max-remove", type=positive_int,
                   help="combinatorial, compare: most blocks removed (default: L-1)")
    g.add_argument("--ratio", type=float, default=0.5,
                   help="random, importance, greedy, beam: fraction of blocks to remove (default 0.5)")
    g.add_argument("--num-remove", type=positive_int,
                   help="random, importance, greedy, beam: number of blocks to remove (overrides --ratio)")

    g = p.add_argument_group("choosing blocks on calibration tokens (importance, greedy, beam, compare)")
    g.add_argument("--metric", choices=METRICS, help="importance: bi (ShortGPT), angular (Gromov et al.) or ppl "
                   "(Shortened LLaMA); default bi")
    g.add_argument("--beam-width", type=positive_int, help="beam, compare: sets kept per search step (default 4)")
    g.add_argument("--calib-tokens", type=positive_int, default=16384,
                   help="calibration tokens from the train split (default 16384)")
    g.add_argument("--max-configs", type=positive_int, default=5000,
                   help="compare: exhaustive optimum only where C(L, k) <= this (default 5000)")

    g = p.add_argument_group("speed")
    g.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    g.add_argument("--speed-runs", type=positive_int, default=10, help="timed generate() runs (default 10)")
    g.add_argument("--speed-warmup", type=non_negative_int, default=2, help="untimed warm-up runs (default 2)")
    g.add_argument("--gen-tokens", type=positive_int, default=64, help="tokens generated per run (default 64)")
    g.add_argument("--prompt", default="The future of artificial intelligence is", help="prompt for the speed test")

    g = p.add_argument_group("output")
    g.add_argument("--save_results", "--save-results", dest="save_results", action="store_true",
                   help="write a CSV row per configuration to --output-dir")
    g.add_argument("--output-dir", default="results", help="folder for results files (default: results/)")
    g.add_argument("--resume", metavar="FILE", help="continue a results CSV, skipping configurations it holds")
    g.add_argument("--save-model", metavar="DIR", help="custom/random/importance/greedy/beam: write the pruned "
                   "(and healed) model, tokenizer and a model card to DIR")
    g.add_argument("--plot", action="store_true",
                   help="also write PNG figures beside the CSV (implies --save_results)")
    g.add_argument("--input", metavar="CSV", help="--mode report: the results CSV to report on")
    g.add_argument("--quiet", action="store_true", help="print only errors and output paths")

    g = p.add_argument_group("splitting a sweep (see also: accelerate launch main.py ...)")
    g.add_argument("--shard", type=shard_spec, metavar="I/N",
                   help="evaluate only job I's share (0 <= I < N) of the configurations, plus the baseline")
    g.add_argument("--inputs", nargs="+", metavar="CSV", help="--mode merge: the shard results files to join")

    g = p.add_argument_group("healing (fine-tune the pruned model; custom/random/importance/greedy/beam)")
    g.add_argument("--heal-steps", type=non_negative_int, default=0, help="training steps (default 0: no healing)")
    g.add_argument("--heal-mode", default="lora", choices=["lora", "full"],
                   help="lora: adapters merged into the weights (default); full: train every weight")
    g.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank (default 8; alpha = 2 x rank)")
    g.add_argument("--heal-kd", action="store_true",
                   help="distil from the unpruned model's logits (KL) instead of next-token loss")
    g.add_argument("--heal-lr", type=float, help="learning rate (default: 2e-4 for lora, 2e-5 for full)")
    g.add_argument("--heal-batch-size", type=positive_int, default=4, help="windows per step (default 4)")
    g.add_argument("--heal-seq-len", type=positive_int, help="tokens per window (default: 256 or the context size)")
    g.add_argument("--train-dataset", help="training text, Hub dataset or local file like --dataset "
                   "(default: the train split of --dataset; required when --dataset is a local file)")
    return p


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks that need no model; those that need its depth run after loading it."""
    if not 0.0 < args.ratio < 1.0:
        parser.error(f"--ratio must be strictly between 0 and 1, got {args.ratio}")
    if args.max_length and args.stride and args.stride > args.max_length:
        parser.error(f"--stride {args.stride} is larger than --max-length {args.max_length}")
    if args.mode == "combinatorial" and args.max_remove is not None and args.max_remove < args.min_remove:
        parser.error(f"--max-remove ({args.max_remove}) is smaller than --min-remove ({args.min_remove})")
    if args.remove is not None and args.mode != "custom":
        parser.error(f"--remove is only used by --mode custom, not {args.mode}")
    if args.metric is not None and args.mode != "importance":
        parser.error(f"--metric is only used by --mode importance, not {args.mode}")
    if args.beam_width is not None and args.mode not in ("beam", "compare"):
        parser.error(f"--beam-width is only used by --mode beam or compare, not {args.mode}")
    if args.shard and args.mode in CHOOSERS:
        parser.error(f"--shard splits a planned sweep; --mode {args.mode} chooses its blocks on calibration tokens "
                     "and needs every row (run it in one job, or with accelerate launch)")
    args.metric = args.metric or "bi"
    args.beam_width = args.beam_width or 4
    if args.mode == "report" and not args.input:
        parser.error("--mode report needs --input RESULTS.csv (a CSV written with --save_results)")
    if args.input and args.mode != "report":
        parser.error(f"--input is only used by --mode report, not {args.mode}")
    if args.mode == MERGE and not args.inputs:
        parser.error("--mode merge needs --inputs A.csv B.csv ...")
    if args.inputs and args.mode != MERGE:
        parser.error(f"--inputs is only used by --mode merge, not {args.mode}")
    if args.mode == MERGE and (args.shard or args.resume):
        parser.error("--mode merge takes neither --shard nor --resume; it writes a new file in --output-dir")
    if not args.heal_steps and (args.heal_kd or args.train_dataset or args.heal_lr is not None):
        parser.error("--heal-kd, --heal-lr and --train-dataset need --heal-steps N (N > 0)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    args.command_line = ["python", "main.py", *(sys.argv[1:] if argv is None else argv)]

    from utils.log import setup_logging
    from utils.pipeline import merge, run
    from utils.report import report_from_csv

    setup_logging(args.quiet)
    try:
        if args.mode == "report":
            return report_from_csv(args)
        return merge(args) if args.mode == MERGE else run(args)
    except KitError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
