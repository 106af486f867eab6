"""Every command-line option, declared once.

An Option names its flag, the RunConfig field it fills (``to``: "select.num_remove"),
its type, help, the modes that read it (None: every mode) and what it needs.
Its default is the field's default in config.py, so each default is stated in
one place. From this table main.py builds the parser, the "only used by"
checks and the RunConfig. Checks that relate several options are the small
functions of CROSS_CHECKS.

Adding an option is one Option here (and the field it fills in config.py);
docs/architecture.md shows an example. Importing this module loads no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from config import DEFAULT_PROMPT, PATCHES, RunConfig, parse_shard
from evaluation.windows import PROTOCOLS
from models.units import UNIT_KINDS, Unit
from pruning.budget import parse_params_target
from pruning.rules import RULES
from runner.modes import MODES, Mode, either, saving_modes
from utils.errors import KitError

UNSET = object()


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser that raises KitError with the message to show."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except KitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _whole(text: str, least: int) -> int:
    if not text.lstrip("-").isdigit():
        raise KitError(f"expected a whole number, got '{text}'")
    value = int(text)
    if value < least:
        raise KitError(f"must be positive, got {value}" if least == 1 else f"expected a whole number >= {least}, "
                       f"got '{text}'")
    return value


positive_int = _typed(lambda text: _whole(text, 1))
non_negative_int = _typed(lambda text: _whole(text, 0))


@_typed
def removal_list(text: str) -> tuple[Unit, ...]:
    """Block indices and sublayers (attn4, mlp5), comma-separated."""
    try:
        return tuple(Unit.parse(part) for part in text.split(",") if part.strip())
    except KitError:
        raise KitError(f"expected comma-separated block indices such as 1,3 (or units such as 2,attn4,mlp5), "
                       f"got '{text}'") from None


@_typed
def task_names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise KitError(f"expected task names such as piqa,arc_easy, got '{text}'")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated:
        raise KitError(f"task '{repeated}' is listed twice")
    return names


def _number(text: str, example: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise KitError(f"expected a number such as {example}, got '{text}'") from None


@_typed
def ratio(text: str) -> float:
    value = _number(text, "0.25")
    if not 0.0 < value < 1.0:
        raise KitError(f"--ratio must be strictly between 0 and 1, got {text}")
    return value


@_typed
def speedup(text: str) -> float:
    value = _number(text, "1.3")
    if not value > 1:
        raise KitError(f"--target-speedup must be above 1 (1.3 = 30% faster), got {value}")
    return value


# A count of parameters below this is a typo, not a model (no decoder LM is this small).
MIN_PARAMS_COUNT = 1000


@_typed
def params_budgets(text: str) -> str:
    """One budget (0.8, 60M), or for compare several (0.9,0.8); each checked here.

    A budget with a decimal point and no K/M/B suffix is a fraction and must lie in (0, 1); a count is written
    as a whole number (60000000) or with a suffix (60M) and is at least MIN_PARAMS_COUNT. So '2.0' and '2' are
    refused rather than read as "keep two parameters"."""
    for budget in text.split(","):
        value = parse_params_target(budget)
        plain = budget.strip()
        if "." in plain and plain[-1:].isdigit() and not 0 < value < 1:
            raise KitError(f"--target-params '{plain}' is neither a fraction in (0, 1) such as 0.8 nor a "
                           "count such as 60M or 60000000")
        if value >= 1 and value < MIN_PARAMS_COUNT:
            raise KitError(f"--target-params '{plain}' asks for {value:,.0f} parameters; give a fraction of the "
                           "original such as 0.8 or a count such as 60M")
    return text


@_typed
def learning_rate(text: str) -> float:
    value = _number(text, "1e-4")
    if not 0 < value < float("inf"):
        raise KitError(f"must be a positive, finite number, got {text}")
    return value


@dataclass(frozen=True)
class Option:
    flag: str
    to: str  # the RunConfig field it fills: "select.num_remove" (also "seed": a field of RunConfig itself)
    help: str
    group: str
    type: Callable[[str], Any] | None = None
    flag_only: bool = False  # a switch: present or not
    choices: tuple[str, ...] | None = None
    modes: tuple[str, ...] | None = None  # the modes that read it; None: every mode
    # given to a mode that ignores it: "error"; "warn" where older versions ignored it silently; "differs": an
    # error only when the value is not the default
    outside: str = "error"
    requires: str | None = None  # another option's field that must be set for this one to mean anything
    default: Any = UNSET  # UNSET: the field's default in config.py
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    nargs: str | None = None
    also: tuple[str, ...] = ()  # further fields it fills with the same value
    convert: Callable[[Any], Any] | None = None  # from the parsed value to the field's

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def value_default(self) -> Any:
        """The value a run gets when the option is not given."""
        if self.default is not UNSET:
            return self.default
        if self.flag_only:
            return False
        return field_default(self.to)

    def reads(self, mode: str) -> bool:
        return self.modes is None or mode in self.modes


def field_default(path: str) -> Any:
    """The default of a RunConfig field given as 'spec.field' (or a field of RunConfig itself)."""
    owner: Any = RunConfig
    *specs, name = path.split(".")
    for spec in specs:
        owner = {f.name: f for f in dataclasses.fields(owner)}[spec].default_factory
    found = {f.name: f for f in dataclasses.fields(owner)}[name]
    return found.default if found.default is not dataclasses.MISSING else found.default_factory()


HOW_MANY = ("random", "importance", "greedy", "beam", "evolve")
CALIBRATING = ("importance", "greedy", "beam", "evolve", "compare")
SEARCHING = ("greedy", "beam", "evolve", "compare")
UNIT_MODES = ("sequential", "combinatorial", *HOW_MANY, "compare")
SAVING = tuple(saving_modes())

MODEL, WINDOWS, WHICH, CALIB, SPEED, TASKS, OUTPUT, SPLIT, HEAL = (
    "model and data", "perplexity", "which blocks",
    f"choosing blocks on calibration tokens ({', '.join(CALIBRATING)})", "speed",
    "downstream tasks (lm-evaluation-harness)", "output", "splitting a sweep (see also: accelerate launch main.py ...)",
    f"healing (fine-tune the pruned model; {'/'.join(SAVING)})")

OPTIONS: tuple[Option, ...] = (
    Option("--model", "data.model", "Hub id, local directory or .gguf file", MODEL),
    Option("--gguf-file", "data.gguf_file", "the .gguf file in the --model folder or Hub repo to load, dequantized "
           "to --dtype", MODEL, metavar="NAME"),
    Option("--dataset", "data.dataset", "Hub dataset (wikitext-2-raw-v1, or ID[:CONFIG]) or a local "
           ".txt/.json/.jsonl/.csv/.parquet file", MODEL),
    Option("--split", "data.split", "Hub dataset split", MODEL),
    Option("--text-column", "data.text_column", "column holding the text", MODEL),
    Option("--device", "device", "where the model runs", MODEL, choices=("auto", "cpu", "cuda", "mps")),
    Option("--dtype", "dtype", "auto: float32 on CPU, the checkpoint's dtype elsewhere", MODEL,
           choices=("auto", "float32", "float16", "bfloat16")),
    Option("--seed", "seed", "random draws (--mode random, evolve, healing batches)", MODEL, type=int,
           also=("heal.seed", "select.seed")),
    Option("--cache-dir", "data.cache_dir", "where tokenized datasets are cached (default: "
           "~/.cache/gpt2-pruning-kit)", MODEL),
    Option("--no-cache", "data.no_cache", "tokenize the dataset afresh and cache nothing", MODEL, flag_only=True),
    Option("--trust-remote-code", "data.trust_remote_code", "allow a model directory's own code (auto_map), and an "
           "--include-path task's Python (!function), to run; without it such a model or task is refused", MODEL,
           flag_only=True),
    Option("--device-map", "data.device_map", "spread one model over GPUs, CPU memory and disk (accelerate); "
           "replaces --device", MODEL, choices=("auto", "balanced", "balanced_low_0", "sequential")),
    Option("--max-memory", "data.max_memory", "--device-map's limit per device, e.g. 0=20GiB,cpu=60GiB", MODEL,
           metavar="DEV=SIZE,...", requires="data.device_map"),
    Option("--offload-dir", "data.offload_dir", "folder for the weights --device-map puts on disk", MODEL,
           metavar="DIR", requires="data.device_map"),

    Option("--max-length", "windows.max_length", "window length (default: the model's context size)", WINDOWS,
           type=positive_int),
    Option("--stride", "windows.stride", "window step (default: 512, or half of --max-length if smaller)", WINDOWS,
           type=positive_int),
    Option("--max-tokens", "data.max_tokens", "evaluate only the first N tokens (default: all)", WINDOWS,
           type=positive_int),
    Option("--batch-size", "windows.batch_size", "windows per forward pass", WINDOWS, type=positive_int),
    Option("--protocol", "windows.protocol", "perplexity protocol: "
           + "; ".join(f"{name}: {p.help}" for name, p in PROTOCOLS.items()), WINDOWS, choices=tuple(PROTOCOLS)),
    Option("--kl", "windows.kl", "also measure each configuration's KL divergence from the baseline and top-1 "
           "agreement with it (about 18% more time for distilgpt2 on a CPU; keeps the baseline's probabilities of "
           "one window batch: positions x vocabulary)", WINDOWS, flag_only=True),
    Option("--bos", "windows.bos", "feed the tokenizer's BOS token before every window (sliding, disjoint); Llama, "
           "Mistral and Qwen2 checkpoints were trained with it, GPT-2 was not", WINDOWS, flag_only=True),

    Option("--remove", "select.remove", "blocks to remove, e.g. 1,3; attnN / mlpN remove one sublayer of block N, "
           "e.g. 2,attn4,mlp5", WHICH, type=removal_list, modes=("custom",)),
    Option("--unit", "select.unit", "what a candidate is: a whole block, a block's attention (attn), its MLP "
           "(mlp), or either sublayer (sublayer)", WHICH, choices=UNIT_KINDS, modes=UNIT_MODES, outside="differs"),
    Option("--min-remove", "select.min_remove", "fewest blocks removed", WHICH, type=positive_int,
           modes=("combinatorial",), outside="warn"),
    Option("--max-remove", "select.max_remove", "most blocks removed (default: L-1)", WHICH, type=positive_int,
           modes=("combinatorial", "compare"), outside="warn"),
    Option("--ratio", "select.ratio", "fraction of blocks to remove", WHICH, type=ratio, modes=HOW_MANY,
           outside="warn"),
    Option("--num-remove", "select.num_remove", "number of blocks to remove (overrides --ratio)", WHICH,
           type=positive_int, modes=HOW_MANY, outside="warn"),
    Option("--target-params", "select.target_params", "remove units until at most P parameters remain: a fraction "
           "of the original (0.8) or a count (60M); replaces --num-remove; compare: whole blocks against sublayers "
           "at each budget (0.9,0.8)", WHICH, type=params_budgets, modes=CALIBRATING, metavar="P"),
    Option("--target-speedup", "select.target_speedup", "remove units until the measured prefill is X times as fast "
           "as the unpruned model's (1.3); compare: whole blocks against sublayers at that speed-up", WHICH,
           type=speedup, modes=CALIBRATING, metavar="X"),

    Option("--metric", "select.rule", "the scoring rule: "
           + ", ".join(f"{name} ({rule.title})" for name, rule in RULES.items()), CALIB, choices=tuple(RULES),
           modes=("importance",)),
    Option("--beam-width", "select.beam_width", "sets kept per search step", CALIB, type=positive_int,
           modes=("beam", "compare")),
    Option("--generations", "select.generations", "evolve's generations at each k (EvoPress)", CALIB,
           type=positive_int, modes=("evolve", "compare")),
    Option("--offspring", "select.offspring", "evolve's offspring per generation, raced on a quarter, a half and "
           "all of the calibration tokens", CALIB, type=positive_int, modes=("evolve", "compare")),
    Option("--race", "select.race", "greedy and beam score each step's candidates on a quarter of the calibration "
           "tokens first, and only the best quarter on more (docs/search.md)", CALIB, flag_only=True,
           modes=SEARCHING),
    Option("--calib-slices", "select.calib_slices", "also choose on N disjoint slices of the calibration tokens and "
           "report how much the picks agree (mean pairwise Jaccard) and their perplexity spread", CALIB,
           type=positive_int, modes=CALIBRATING),
    Option("--calib-tokens", "select.calib_tokens", "calibration tokens from the train split", CALIB,
           type=positive_int, modes=CALIBRATING, outside="warn"),
    Option("--max-configs", "select.max_configs", "the most configurations combinatorial plans; compare's exhaustive "
           "optimum only where C(L, k) <= this", CALIB,
           type=positive_int, modes=("combinatorial", "compare"), outside="warn"),

    Option("--patch", "select.patch", "compensate each removed run of blocks, fitted on --calib-tokens calibration "
           "tokens and merged into the weights: lstsq or cosine (a linear map, ReplaceMe), magnitude (a scale, "
           "Prune&Comp), none; compare: each rule's pick with and without it (docs/compensation.md)", CALIB,
           choices=PATCHES),
    Option("--choose-patched", "select.choose_patched", "score every candidate set with its own --patch fitted on "
           "the calibration tokens, so the choice is what is best once compensated (with --patch magnitude and "
           "greedy, Prune&Comp's iterative prune-and-compensate loop); costs a fit per candidate", CALIB,
           flag_only=True, modes=("importance", "greedy", "beam", "evolve")),

    Option("--no-speed", "speed.enabled", "skip the latency measurement", SPEED, flag_only=True,
           convert=lambda given: not given),
    Option("--speed-runs", "speed.runs", "timed generate() runs per model; a pruned configuration's alternate with "
           "as many baseline runs, so it costs twice that", SPEED, type=positive_int),
    Option("--speed-warmup", "speed.warmup", "untimed warm-up runs", SPEED, type=non_negative_int),
    Option("--gen-tokens", "speed.gen_tokens", "tokens generated per run", SPEED, type=positive_int),
    Option("--prompt", "speed.prompt", "prompt for the speed test", SPEED, default=DEFAULT_PROMPT),

    Option("--tasks", "tasks.names", "lm-eval tasks to score every configuration on, e.g. piqa,winogrande,"
           "hellaswag,arc_easy,arc_challenge. Sweeps score every configuration (sequential: L+1 full evaluations of "
           "each task), the choosing modes only the ones they settle on; each costs one forward pass per answer "
           "choice of every example (HellaSwag: 40k)", TASKS, type=task_names, metavar="NAME[,NAME...]",
           modes=tuple(m.name for m in MODES.values() if m.evaluates)),
    Option("--num-fewshot", "tasks.num_fewshot", "examples shown before each question (default: the task's own, 0 "
           "for the five-task set)", TASKS, type=non_negative_int, requires="tasks.names"),
    Option("--limit", "tasks.limit", "score only the first N examples of each task (quick runs)", TASKS,
           type=positive_int, requires="tasks.names"),
    Option("--tasks-batch-size", "tasks.batch_size", "lm-eval batch size", TASKS, type=positive_int,
           requires="tasks.names"),
    Option("--include-path", "tasks.include_path", "folder of lm-eval task YAML files, e.g. over local jsonl data "
           "(offline or private tasks); a YAML naming Python (!function) runs it, so it needs --trust-remote-code",
           TASKS, metavar="DIR", requires="tasks.names"),

    Option("--save-results", "output.save_results", "write a CSV row per configuration to --output-dir", OUTPUT,
           flag_only=True, aliases=("--save_results",)),
    Option("--output-dir", "output.output_dir", "folder for results files", OUTPUT),
    Option("--resume", "output.resume", "continue a results CSV, skipping configurations it holds", OUTPUT,
           metavar="FILE"),
    Option("--save-model", "output.save_model", f"{', '.join(SAVING)}: write the pruned (and healed) model, "
           "tokenizer and a model card to DIR", OUTPUT, metavar="DIR"),
    Option("--save-gguf", "output.save_gguf", f"{', '.join(SAVING)}: write the pruned model as a GGUF file, kept "
           "tensors byte for byte (a GGUF source, whole blocks only)", OUTPUT, metavar="FILE"),
    Option("--plot", "output.plot", "also write PNG figures beside the CSV (implies --save_results)", OUTPUT,
           flag_only=True),
    Option("--input", "output.input", "the results CSV to report on", OUTPUT, metavar="CSV", modes=("report",)),
    Option("--quiet", "output.quiet", "print only errors and output paths", OUTPUT, flag_only=True),

    Option("--shard", "output.shard", "evaluate only job I's share (0 <= I < N) of the configurations, plus the "
           "baseline", SPLIT, type=_typed(parse_shard), metavar="I/N"),
    Option("--inputs", "output.inputs", "the shard results files to join", SPLIT, metavar="CSV", nargs="+",
           modes=("merge",), convert=tuple),
    Option("--allow-partial", "output.allow_partial", "join the files given even if shards are missing (the merged "
           "file is then named and reported as partial)", SPLIT, flag_only=True, modes=("merge",)),

    Option("--heal-steps", "heal.steps", "training steps (0: no healing)", HEAL, type=non_negative_int),
    Option("--heal-mode", "heal.mode", "lora: adapters merged into the weights; full: train every weight", HEAL,
           choices=("lora", "full")),
    Option("--lora-rank", "heal.lora_rank", "LoRA rank (alpha = 2 x rank)", HEAL, type=positive_int),
    Option("--heal-kd", "heal.kd", "distil from the unpruned model's logits (KL) instead of next-token loss", HEAL,
           flag_only=True, requires="heal.steps"),
    Option("--heal-lr", "heal.lr", "learning rate (default: 2e-4 for lora, 2e-5 for full)", HEAL,
           type=learning_rate, requires="heal.steps"),
    Option("--heal-batch-size", "heal.batch_size", "windows per step", HEAL, type=positive_int),
    Option("--heal-seq-len", "heal.seq_len", "tokens per window (default: 256 or the context size)", HEAL,
           type=positive_int),
    Option("--train-dataset", "heal.train_dataset", "training text, Hub dataset or local file like --dataset "
           "(default: the train split of --dataset; required when --dataset is a local file)", HEAL,
           requires="heal.steps"),
)
BY_DEST = {o.dest: o for o in OPTIONS}
BY_FIELD = {o.to: o for o in OPTIONS}


def help_text(option: Option) -> str:
    text = option.help
    if option.modes is not None:
        text = f"{', '.join(option.modes)}: {text}"
    default = option.value_default
    if default not in (None, False, ()) and "default" not in text and option.default is UNSET:
        text += f" (default: {default})"
    return text.replace("%", "%%")


class Parser(argparse.ArgumentParser):
    """Bad arguments give one line and exit status 2, like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


class UsageError(Exception):
    """A command line that cannot run; main prints it as one line and exits with status 2."""


def build_parser() -> argparse.ArgumentParser:
    """Every option with default None, so that a given option can be told from one left out."""
    p = Parser(prog="main.py", description="Remove transformer blocks from a decoder language model and measure "
               "perplexity, latency and size.")
    p.add_argument("--mode", required=True, choices=sorted(MODES),
                   help="; ".join(f"{m.name}: {m.help}" for m in MODES.values()))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in OPTIONS:
        group = groups.setdefault(o.group, p.add_argument_group(o.group))
        kwargs: dict[str, Any] = {"dest": o.dest, "default": None, "help": help_text(o)}
        if o.flag_only:
            kwargs["action"] = "store_true"
        else:
            kwargs.update({k: v for k, v in (("type", o.type), ("choices", o.choices), ("metavar", o.metavar),
                                             ("nargs", o.nargs)) if v is not None})
        group.add_argument(o.flag, *o.aliases, **kwargs)
    return p


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The options the command line set, by field."""
    return {o.to: getattr(args, o.dest) for o in OPTIONS if getattr(args, o.dest) is not None}


def values(args: argparse.Namespace) -> dict[str, Any]:
    """Every field's value: the command line's, else its default."""
    return {o.to: (getattr(args, o.dest) if getattr(args, o.dest) is not None else o.value_default) for o in OPTIONS}


def mode_checks(mode: Mode, set_: dict[str, Any], v: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the declared rules: options the mode ignores, options that need another."""
    errors, warnings = [], []
    for field, value in set_.items():
        o = BY_FIELD[field]
        if not o.reads(mode.name):
            where = f"--mode {either(list(o.modes or ()))}"
            if o.outside == "error" or (o.outside == "differs" and value != o.value_default):
                errors.append(f"{o.flag} is only used by {where}, not {mode.name}")
            else:
                warnings.append(f"{o.flag} is only used by {where}; --mode {mode.name} ignores it")
        if o.requires and not v[o.requires]:
            needed = BY_FIELD[o.requires]
            errors.append(f"{o.flag} needs {needed.flag} {needed.metavar or 'N'}" + (" (N > 0)" if needed.type is
                                                                                   non_negative_int else ""))
    for option, message in mode.needs:
        if not v[BY_DEST[option].to]:
            errors.append(message)
    return errors, warnings


# Rules that relate several options: each takes the mode, the fields set on the command line and every
# field's value, and says what is wrong (or None).
def _choose_patched(mode, set_, v):
    if v["select.choose_patched"] and v["select.patch"] == "none":
        return "--choose-patched needs --patch METHOD (lstsq, cosine, magnitude)"
    if v["select.choose_patched"] and mode.name == "importance" and RULES[v["select.rule"]].one_pass:
        return (f"--choose-patched changes only choices scored by perplexity, and --metric {v['select.rule']} reads "
                "one pass of the unpruned model: use --metric ppl, or --mode greedy, beam or evolve")


def _one_budget(mode, set_, v):
    if "," in (v["select.target_params"] or "") and not mode.budgets:
        return "several --target-params budgets (0.9,0.8) are for --mode compare; give one"


def _two_budgets(mode, set_, v):
    if v["select.target_params"] is not None and v["select.target_speedup"] is not None:
        return "give --target-params or --target-speedup, not both"


def _budget_sets_unit(mode, set_, v):
    budget = v["select.target_params"] or v["select.target_speedup"]
    if mode.budgets and v["select.unit"] != "block" and budget:
        return f"--mode {mode.name} with a budget sets whole blocks against sublayers itself; drop --unit"


def _slices_and_budgets(mode, set_, v):
    if mode.budgets and v["select.calib_slices"] > 1 and (v["select.target_params"] or v["select.target_speedup"]):
        return (f"--calib-slices reports the stability of --mode {mode.name}'s rules at each k; with a budget it "
                "sets whole blocks against sublayers instead; drop one")


def _count_and_budget(mode, set_, v):
    if v["select.num_remove"] is not None and (v["select.target_params"] or v["select.target_speedup"]):
        return "--num-remove and a --target-* budget both say how much to remove; give one"


def _windows(mode, set_, v):
    length, stride, protocol = v["windows.max_length"], v["windows.stride"], v["windows.protocol"]
    if length and stride and stride > length:
        return f"--stride {stride} is larger than --max-length {length}"
    if stride and not PROTOCOLS[protocol].strided:
        return f"--stride is only used by --protocol sliding; {protocol} windows do not overlap"
    if v["windows.bos"] and not PROTOCOLS[protocol].takes_bos:
        return (f"--bos does not apply to --protocol {protocol}, which feeds its own first token (BOS, or "
                "end-of-text where the tokenizer has none)")


def _remove_range(mode, set_, v):
    low, high = v["select.min_remove"], v["select.max_remove"]
    if high is not None and BY_FIELD["select.min_remove"].reads(mode.name) and high < low:
        return f"--max-remove ({high}) is smaller than --min-remove ({low})"


def _shard(mode, set_, v):
    if v["output.shard"] and (v["output.save_model"] or v["output.save_gguf"] or v["heal.steps"]):
        return ("--save-model and --heal-steps need the whole run's result; a --shard job evaluates only its share "
                "(save or heal in an unsharded run)")
    if v["output.shard"] and mode.calibrates:
        return (f"--shard splits a planned sweep; --mode {mode.name} chooses its blocks on calibration tokens and "
                "needs every row (run it in one job, or with accelerate launch)")


def _text_column(mode, set_, v):
    texts = [p for p in (v["data.dataset"], v["heal.train_dataset"]) if p]
    # the default column ("text", which model cards' commands spell out) is harmless
    plain = all(p.lower().endswith(".txt") for p in texts)
    if v["data.text_column"] != field_default("data.text_column") and plain:
        return ("--text-column names a column of a .json/.jsonl/.csv/.parquet file or Hub dataset; "
                f"'{v['data.dataset']}' is plain text, which has none")


def _evaluates(mode, set_, v):
    if not mode.evaluates and (v["output.shard"] or v["output.resume"]):
        return f"--mode {mode.name} takes neither --shard nor --resume; it evaluates nothing and writes new files"
    if not mode.evaluates and v["tasks.names"]:
        return f"--mode {mode.name} evaluates nothing; --tasks scores the models an evaluating mode measures"


CROSS_CHECKS = (_evaluates, _text_column, _choose_patched, _one_budget, _two_budgets, _budget_sets_unit,
                _slices_and_budgets, _count_and_budget, _windows, _remove_range, _shard)


def check(args: argparse.Namespace) -> list[str]:
    """Raise UsageError for a command line that cannot run; return the warnings for one that can.

    Checks that need the model (its depth, its context) run after it loads."""
    mode, set_, v = MODES[args.mode], given(args), values(args)
    errors, warnings = mode_checks(mode, set_, v)
    errors += [e for rule in CROSS_CHECKS if (e := rule(mode, set_, v))]
    if errors:
        raise UsageError(errors[0])
    return warnings


def to_config(args: argparse.Namespace, command_line: list[str]) -> RunConfig:
    """The one place where argparse's Namespace becomes the run's settings: keyword construction of each spec."""
    fields: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for o in OPTIONS:
        value = getattr(args, o.dest)
        value = o.value_default if value is None else value
        if o.convert is not None:
            value = o.convert(value)
        for path in (o.to, *o.also):
            spec, _, name = path.rpartition(".")
            (fields.setdefault(spec, {}) if spec else top)[name] = value
    specs = {f.name: f.default_factory(**fields.get(f.name, {}))  # type: ignore[misc]
             for f in dataclasses.fields(RunConfig) if f.name in fields}
    return RunConfig(mode=args.mode, **specs, **top, command_line=tuple(command_line))

