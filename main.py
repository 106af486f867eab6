"""gpt2-pruning-kit command line: parse, validate, turn into a RunConfig, dispatch.

Nothing here loads torch: `python main.py --help` and every argument error
answer at once. The mode registry (pruning.modes) supplies --mode's choices,
who reads each mode-specific option, and the checks of both.
"""

from __future__ import annotations

import argparse
import sys

from config import (DEFAULT_PROMPT, DataSpec, HealSpec, OutputSpec, RunConfig, SelectSpec, Shard, SpeedSpec,
                    TaskSpec, WindowSpec, parse_shard)
from evaluation.windows import CONVENTIONS, DEFAULT_PROTOCOL
from pruning.modes import MODE_OPTIONS, MODES, either, saving_modes, users
from models.units import UNIT_KINDS, parse_unit
from pruning.budget import parse_params_target
from pruning.rules import RULES
from utils.errors import KitError

# Mode-specific options that earlier versions ignored silently outside their modes: a warning, not an error,
# so that existing scripts keep running.
IGNORED_WITH_WARNING = ("max_remove", "num_remove")


class Parser(argparse.ArgumentParser):
    """Bad arguments give one line and exit status 2, like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def removal_list(text: str) -> list[int | str]:
    """Block indices and sublayers (attn4, mlp5), comma-separated."""
    try:
        return [parse_unit(part) for part in text.split(",") if part.strip()]
    except KitError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices such as 1,3 (or units such as "
                                         f"2,attn4,mlp5), got '{text}'") from None


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


def task_names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected task names such as piqa,arc_easy, got '{text}'")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated:
        raise argparse.ArgumentTypeError(f"task '{repeated}' is listed twice")
    return names


def shard_spec(text: str) -> Shard:
    try:
        return parse_shard(text)
    except KitError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def used_by(option: str) -> str:
    return ", ".join(users(option))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="main.py", description="Remove transformer blocks from a GPT-2 model and measure "
               "perplexity, latency and size.")
    p.add_argument("--mode", required=True, choices=sorted(MODES),
                   help="; ".join(f"{m.name}: {m.help}" for m in MODES.values()))

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
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory's own code (auto_map) to run; without it such a model is refused")

    g = p.add_argument_group("perplexity")
    g.add_argument("--max-length", type=positive_int, help="window length (default: the model's context size)")
    g.add_argument("--stride", type=positive_int, help="window step (default: 512, or half of --max-length if smaller)")
    g.add_argument("--max-tokens", type=positive_int, help="evaluate only the first N tokens (default: all)")
    g.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default: 1)")
    g.add_argument("--protocol", choices=list(CONVENTIONS), default=DEFAULT_PROTOCOL,
                   help="perplexity convention (default: sliding): "
                        + "; ".join(f"{name}: {c.help}" for name, c in CONVENTIONS.items()))
    g.add_argument("--bos", action="store_true",
                   help="feed the tokenizer's BOS token before every window (sliding, disjoint); Llama, Mistral and "
                        "Qwen2 checkpoints were trained with it, GPT-2 was not")
    g.add_argument("--kl", action="store_true", help="also measure each configuration's KL divergence from the "
                   "baseline and top-1 agreement with it (about 18%% more time for distilgpt2 on a CPU; keeps the "
                   "baseline's probabilities of one window batch: positions x vocabulary)")

    g = p.add_argument_group("which blocks")
    g.add_argument("--remove", type=removal_list, help=f"{used_by('remove')}: blocks to remove, e.g. 1,3; "
                   "attnN / mlpN remove one sublayer of block N, e.g. 2,attn4,mlp5")
    g.add_argument("--unit", choices=UNIT_KINDS, default="block",
                   help=f"{used_by('unit')}: what a candidate is: a whole block (default), a block's attention "
                        "(attn), its MLP (mlp), or either sublayer (sublayer)")
    g.add_argument("--min-remove", type=positive_int, default=2,
                   help=f"{used_by('min_remove')}: fewest blocks removed (default 2)")
    g.add_argument("--max-remove", type=positive_int,
                   help=f"{used_by('max_remove')}: most blocks removed (default: L-1)")
    g.add_argument("--ratio", type=float, default=0.5,
                   help=f"{used_by('ratio')}: fraction of blocks to remove (default 0.5)")
    g.add_argument("--num-remove", type=positive_int,
                   help=f"{used_by('num_remove')}: number of blocks to remove (overrides --ratio)")

    g.add_argument("--target-params", metavar="P", help=f"{used_by('target_params')}: remove units until at most P "
                   "parameters remain: a fraction of the original (0.8) or a count (60M); replaces --num-remove; "
                   "compare: whole blocks against sublayers at each budget (0.9,0.8)")
    g.add_argument("--target-speedup", type=float, metavar="X", help=f"{used_by('target_speedup')}: remove units "
                   "until the measured prefill is X times as fast as the unpruned model's (1.3); compare: whole blocks against "
                   "sublayers at that speed-up")

    g = p.add_argument_group(f"choosing blocks on calibration tokens ({used_by('calib_tokens')})")
    g.add_argument("--metric", choices=list(RULES), help=f"{used_by('metric')}: "
                   + ", ".join(f"{name} ({rule.title})" for name, rule in RULES.items()) + "; default bi")
    g.add_argument("--beam-width", type=positive_int,
                   help=f"{used_by('beam_width')}: sets kept per search step (default 4)")
    g.add_argument("--calib-tokens", type=positive_int, default=16384,
                   help="calibration tokens from the train split (default 16384)")
    g.add_argument("--max-configs", type=positive_int, default=5000,
                   help=f"{used_by('max_configs')}: exhaustive optimum only where C(L, k) <= this (default 5000)")

    g = p.add_argument_group("speed")
    g.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    g.add_argument("--speed-runs", type=positive_int, default=10, help="timed generate() runs per model (default 10); a pruned "
                   "configuration's alternate with as many baseline runs, so it costs twice that")
    g.add_argument("--speed-warmup", type=non_negative_int, default=2, help="untimed warm-up runs (default 2)")
    g.add_argument("--gen-tokens", type=positive_int, default=64, help="tokens generated per run (default 64)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the speed test")

    g = p.add_argument_group("downstream tasks (lm-evaluation-harness)")
    g.add_argument("--tasks", type=task_names, metavar="NAME[,NAME...]",
                   help="lm-eval tasks to score every configuration on, e.g. piqa,winogrande,hellaswag,arc_easy,"
                   "arc_challenge. Sweeps score every configuration (sequential: L+1 full evaluations of each task), "
                   "the choosing modes only the ones they settle on; each costs one forward pass per answer choice "
                   "of every example (HellaSwag: 40k)")
    g.add_argument("--num-fewshot", type=non_negative_int, help="examples shown before each question "
                   "(default: the task's own, 0 for the five-task set)")
    g.add_argument("--limit", type=positive_int, help="score only the first N examples of each task (quick runs)")
    g.add_argument("--tasks-batch-size", type=positive_int, default=1, help="lm-eval batch size (default 1)")
    g.add_argument("--include-path", metavar="DIR", help="folder of lm-eval task YAML files, e.g. over local "
                   "jsonl data (offline or private tasks)")

    saving = "/".join(saving_modes())
    g = p.add_argument_group("output")
    g.add_argument("--save_results", "--save-results", dest="save_results", action="store_true",
                   help="write a CSV row per configuration to --output-dir")
    g.add_argument("--output-dir", default="results", help="folder for results files (default: results/)")
    g.add_argument("--resume", metavar="FILE", help="continue a results CSV, skipping configurations it holds")
    g.add_argument("--save-model", metavar="DIR", help=f"{saving}: write the pruned "
                   "(and healed) model, tokenizer and a model card to DIR")
    g.add_argument("--plot", action="store_true",
                   help="also write PNG figures beside the CSV (implies --save_results)")
    g.add_argument("--input", metavar="CSV", help=f"--mode {used_by('input')}: the results CSV to report on")
    g.add_argument("--quiet", action="store_true", help="print only errors and output paths")

    g = p.add_argument_group("splitting a sweep (see also: accelerate launch main.py ...)")
    g.add_argument("--shard", type=shard_spec, metavar="I/N",
                   help="evaluate only job I's share (0 <= I < N) of the configurations, plus the baseline")
    g.add_argument("--inputs", nargs="+", metavar="CSV",
                   help=f"--mode {used_by('inputs')}: the shard results files to join")
    g.add_argument("--allow-partial", action="store_true", default=None,
                   help=f"--mode {used_by('allow_partial')}: join the files given even if shards are missing "
                        "(the merged file is then named and reported as partial)")

    g = p.add_argument_group(f"healing (fine-tune the pruned model; {saving})")
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
    mode = MODES[args.mode]
    for option, flag in MODE_OPTIONS.items():
        if getattr(args, option) is None or option in mode.options or parser.get_default(option) is not None:
            continue
        where = f"--mode {either(users(option))}"
        if option in IGNORED_WITH_WARNING:
            sys.stderr.write(f"warning: {flag} is only used by {where}; --mode {args.mode} ignores it\n")
        else:
            parser.error(f"{flag} is only used by {where}, not {args.mode}")
    if args.target_params is not None:
        budgets = args.target_params.split(",")
        if len(budgets) > 1 and args.mode != "compare":
            parser.error("several --target-params budgets (0.9,0.8) are for --mode compare; give one")
        try:
            for budget in budgets:
                parse_params_target(budget)
        except KitError as exc:
            parser.error(str(exc))
    if args.target_speedup is not None and not args.target_speedup > 1:
        parser.error(f"--target-speedup must be above 1 (1.3 = 30% faster), got {args.target_speedup}")
    if args.target_params is not None and args.target_speedup is not None:
        parser.error("give --target-params or --target-speedup, not both")
    if args.mode == "compare" and args.unit != "block" and (args.target_params or args.target_speedup):
        parser.error("--mode compare with a budget sets whole blocks against sublayers itself; drop --unit")
    if args.num_remove is not None and (args.target_params is not None or args.target_speedup is not None):
        parser.error("--num-remove and a --target-* budget both say how much to remove; give one")
    if args.unit != "block" and "unit" not in mode.options:
        parser.error(f"--unit is only used by --mode {either(users('unit'))}, not {args.mode}")
    for option, message in mode.needs:
        if not getattr(args, option):
            parser.error(message)
    if not 0.0 < args.ratio < 1.0:
        parser.error(f"--ratio must be strictly between 0 and 1, got {args.ratio}")
    if args.max_length and args.stride and args.stride > args.max_length:
        parser.error(f"--stride {args.stride} is larger than --max-length {args.max_length}")
    convention = CONVENTIONS[args.protocol]
    if args.stride and not convention.strided:
        parser.error(f"--stride is only used by --protocol sliding; {args.protocol} windows do not overlap")
    if args.bos and not convention.takes_bos:
        parser.error(f"--bos does not apply to --protocol {args.protocol}, which feeds its own first token "
                     "(BOS, or end-of-text where the tokenizer has none)")
    if args.max_remove is not None and "min_remove" in mode.options and args.max_remove < args.min_remove:
        parser.error(f"--max-remove ({args.max_remove}) is smaller than --min-remove ({args.min_remove})")
    if args.shard and (args.save_model or args.heal_steps):
        parser.error("--save-model and --heal-steps need the whole run's result; a --shard job evaluates only "
                     "its share (save or heal in an unsharded run)")
    if args.shard and mode.calibrates:
        parser.error(f"--shard splits a planned sweep; --mode {args.mode} chooses its blocks on calibration tokens "
                     "and needs every row (run it in one job, or with accelerate launch)")
    if not mode.evaluates and (args.shard or args.resume):
        parser.error(f"--mode {args.mode} takes neither --shard nor --resume; it evaluates nothing and writes "
                     "new files")
    if not args.tasks and (args.num_fewshot is not None or args.limit or args.include_path
                           or args.tasks_batch_size != parser.get_default("tasks_batch_size")):
        parser.error("--num-fewshot, --limit, --tasks-batch-size and --include-path need --tasks NAME[,NAME...]")
    if args.tasks and not mode.evaluates:
        parser.error(f"--mode {args.mode} evaluates nothing; --tasks scores the models an evaluating mode measures")
    if not args.heal_steps and (args.heal_kd or args.train_dataset or args.heal_lr is not None):
        parser.error("--heal-kd, --heal-lr and --train-dataset need --heal-steps N (N > 0)")


def to_config(args: argparse.Namespace, command_line: list[str]) -> RunConfig:
    """The one place where argparse's Namespace becomes the run's settings."""
    return RunConfig(
        mode=args.mode,
        data=DataSpec(args.model, args.dataset, args.split, args.text_column, args.max_tokens, args.cache_dir,
                      args.no_cache, args.trust_remote_code),
        windows=WindowSpec(args.max_length, args.stride, args.batch_size, args.protocol, args.bos, kl=args.kl),
        select=SelectSpec(tuple(args.remove) if args.remove is not None else None, args.min_remove,
                          args.max_remove, args.ratio, args.num_remove, args.metric or "bi", args.beam_width or 4,
                          args.calib_tokens, args.max_configs, args.unit, args.target_params,
                          args.target_speedup),
        speed=SpeedSpec(not args.no_speed, args.speed_runs, args.speed_warmup, args.gen_tokens, args.prompt),
        heal=HealSpec(args.heal_steps, args.heal_mode, args.heal_lr, args.heal_batch_size, args.heal_seq_len,
                      args.lora_rank, args.heal_kd, args.train_dataset, args.seed),
        output=OutputSpec(args.save_results, args.output_dir, args.resume, args.save_model, args.plot, args.quiet,
                          args.input, tuple(args.inputs or ()), args.shard, bool(args.allow_partial)),
        tasks=TaskSpec(args.tasks or (), args.num_fewshot, args.limit, args.tasks_batch_size, args.include_path),
        device=args.device, dtype=args.dtype, seed=args.seed, command_line=tuple(command_line),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    config = to_config(args, ["python", "main.py", *(sys.argv[1:] if argv is None else argv)])

    from runner import run
    from utils.log import setup_logging

    setup_logging(config.output.quiet)
    try:
        return run(config)
    except KitError as exc:
        sys.stderr.write(f"{'interrupted' if exc.exit_status == 130 else 'error'}: {exc}\n")
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
