"""One evaluating run of the kit, as named stages: check and open the outputs,
load the model, plan, load the data, choose, measure and write. main.py only
parses; runner.run dispatches here for every mode that evaluates a model.

The order is what keeps work from being lost: everything that can make a run
impossible (an unwritable output, a model that cannot be pruned, a prompt
longer than the context, a plan too large) is checked before the first
forward pass, and the results file and its sidecar exist before it too.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from config import HealSpec, RunConfig, WindowSpec
from evaluation.engine import Work
from evaluation.latency import estimated_speed_seconds
from evaluation.params import count_parameters
from evaluation.sweep import EvalSettings, estimated_seconds, measure_all
from evaluation.tasks import load_tasks
from evaluation.windows import resolve_windows, spec_windows
from export.checkpoint import check_save_target, deliver
from export.gguf import check_gguf_output
from export.heal import healing_inputs
from models.families import check_prunable, num_blocks
from models.loading import check_token_ids, dtype_name, load_model, resolve_device
from models.placement import Placement, input_device
from models.removal import context_size
from models.units import Removal, canonical, config_key, row_removal
from pruning.calibration import Calibration, calibration_ids
from pruning.choice import Choice
from pruning.compensation import NONE, Fitter, configurations, measure_patched
from reporting.csvfile import ResultsFile, pass_checkpoint_path, read_rows, results_path
from runner.modes import MODES, saving_modes
from reporting.markdown import write_outputs
from reporting.schema import COLUMNS, task_columns, to_row, with_changes
from reporting.sidecar import write_sidecar
from runner.processes import Processes, current_processes, in_rounds, share
from runner.resume import check_same_experiment, resumed_rows, run_identity
from runner.summary import print_summary
from utils.cache import cached_token_ids, default_cache_dir
from utils.data import check_local_dataset, tokenize
from utils.errors import Interrupted, KitError
from utils.log import progress_bar
from utils.metadata import device_name, now
from utils.text import minutes, plural

log = logging.getLogger("gpt2-pruning-kit")

# A CPU run whose perplexity passes are estimated to take longer than this gets a hint.
CPU_SLOW_SECONDS = 600
# The default window: the model's context, but at most this. Papers report WikiText-2 perplexity of long-context
# models at 2,048 or 4,096 tokens, and a window of 8,192 or 32,768 costs two to eight times as much per scored
# token for a number no one compares with; GPT-2's 1,024 and every context up to this stay as they were.
DEFAULT_MAX_LENGTH = 4096


@dataclass(frozen=True)
class Loaded:
    """What the load stages hand the others: the model, its evaluation tokens and resolved settings."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    planned: list[Removal] | None  # a planning mode's configurations (None: the mode chooses them)
    stream: torch.Tensor  # the dataset's whole token stream
    ids: torch.Tensor  # the evaluated tokens (the first --max-tokens of the stream)
    prompt_ids: torch.Tensor | None
    settings: EvalSettings
    heal: HealSpec | None  # resolved, or None without --heal-steps
    train_ids: torch.Tensor | None
    cache_dir: str | None


def check_outputs(config: RunConfig) -> None:
    """Options the mode cannot honour, and a --save-model directory that is taken or not writable."""
    mode, target = MODES[config.mode], config.output.save_model
    if config.heal.steps and not mode.saves:
        raise KitError(f"--heal-steps works with --mode {', '.join(saving_modes())}, not {config.mode}")
    if config.output.save_gguf and not mode.saves:
        raise KitError(f"--save-gguf works with --mode {', '.join(saving_modes())}, not {config.mode}")
    check_gguf_output(config)
    check_patch_options(config)
    if target is None:
        return
    if not mode.saves:
        raise KitError(f"--save-model works with --mode {', '.join(saving_modes())}, not {config.mode}")
    check_save_target(target)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise KitError(f"--save-model directory '{target}' exists and is not empty; choose a new one")
    parent = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(parent, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=parent))
    except OSError as exc:
        raise KitError(f"--save-model cannot write into '{parent}': {exc.strerror}") from None


def check_patch_options(config: RunConfig) -> None:
    """--patch compensates removed whole blocks: a mode that removes none or picks sublayers cannot use it."""
    select = config.select
    if select.patch == NONE:
        return
    if not MODES[config.mode].removes:
        raise KitError(f"--patch compensates removed blocks; --mode {config.mode} removes none")
    if select.unit != "block":
        raise KitError(f"--patch compensates removed whole blocks; --unit {select.unit} removes sublayers: use "
                       "--patch none, or --unit block")
    if config.mode == "compare" and (select.target_params is not None or select.target_speedup is not None):
        raise KitError("--patch compensates removed whole blocks; --mode compare with a budget sets whole blocks "
                       "against sublayers: drop --patch or the budget")


def open_results(config: RunConfig) -> ResultsFile | None:
    """The results file, created (or, for --resume, locked) before any work; None without a CSV."""
    out, shard = config.output, config.output.shard
    if not out.writes_csv:
        return None
    if out.resume:
        return ResultsFile(out.resume, resume=True)
    # Shards of a Slurm array may start in the same second: their names differ.
    name = f"{config.mode}-shard{shard.index}of{shard.count}" if shard else config.mode
    return ResultsFile(results_path(out.output_dir, config.data.model, name))


def load(config: RunConfig, procs: Processes) -> Loaded:
    """Model, plan, tokens, prompt and healing text: every input checked before any measurement."""
    device = resolve_device(config.device)
    if procs.device is not None and config.device in ("auto", "cuda"):
        device = procs.device  # one accelerator per process
    torch.manual_seed(config.seed)
    mode, data = MODES[config.mode], config.data
    check_local_dataset(data.dataset)  # a missing or unreadable file is named before a model loads for minutes
    if config.heal.steps and config.heal.train_dataset:
        check_local_dataset(config.heal.train_dataset, "--train-dataset")
    placement = Placement(data.device_map, data.max_memory, data.offload_dir)
    if placement.device_map and procs.count > 1:
        raise KitError("--device-map spreads one model over the devices; accelerate launch runs a whole model per "
                       "process: use one or the other")
    if placement.device_map and config.heal.steps:
        raise KitError("--heal-steps trains a copy of the model on one device; it does not work with --device-map")
    model, tokenizer = load_model(data.model, device, config.dtype, data.trust_remote_code, data.gguf_file,
                                  placement)
    device = input_device(model)
    if mode.removes:
        check_prunable(model)
    context = context_size(model)
    windows = resolve_windows(default_length(config.windows, context), context, tokenizer)
    prompt_ids = prompt_tokens(config, tokenizer, context)
    progress = not config.output.quiet and procs.is_main
    # a task that cannot load (or runs code without --trust-remote-code) stops the run before any work
    tasks = load_tasks(config.tasks, tokenizer, progress, data.trust_remote_code)
    # Planning is cheap and may refuse (a plan too large): before the data is read.
    planned = mode.plan(config, num_blocks(model)) if mode.plan else None
    cache_dir = None if data.no_cache else (data.cache_dir or str(default_cache_dir()))
    stream = cached_token_ids(tokenizer, data.dataset, data.split, data.text_column, cache_dir)
    ids = stream[: data.max_tokens] if data.max_tokens else stream
    if len(ids) < 2:
        raise KitError("--max-tokens must be at least 2")
    check_token_ids(model, ids, f"the text of --dataset {data.dataset}")
    if prompt_ids is not None:
        check_token_ids(model, prompt_ids, "--prompt")
    heal, train_ids = healing_inputs(config.heal, data.dataset, data.text_column, model, tokenizer, ids, context,
                                     cache_dir)
    settings = EvalSettings(windows, config.speed, progress=progress, tasks=tasks, divergence=windows.kl)
    return Loaded(model, tokenizer, device, planned, stream, ids, prompt_ids, settings, heal, train_ids, cache_dir)


def default_length(spec: WindowSpec, context: int) -> WindowSpec:
    """``spec`` with the default window length where --max-length was not given: the context, capped at
    DEFAULT_MAX_LENGTH."""
    return spec if spec.max_length else replace(spec, max_length=min(context, DEFAULT_MAX_LENGTH))


def length_source(config: RunConfig, context: int) -> str:
    """Where the window length came from, for the sidecar."""
    if config.windows.max_length:
        return "--max-length"
    if context <= DEFAULT_MAX_LENGTH:
        return "the model's context"
    return f"the model's context capped at {DEFAULT_MAX_LENGTH}"


def prompt_tokens(config: RunConfig, tokenizer, context: int) -> torch.Tensor | None:
    """The speed test's prompt, checked against the context with the tokens it generates."""
    speed = config.speed
    if not speed.enabled:
        return None
    if not speed.prompt.strip():
        raise KitError("--prompt is empty")
    ids = tokenize(tokenizer, speed.prompt, "--prompt", min_tokens=1)
    if len(ids) + speed.gen_tokens > context:
        raise KitError(f"--prompt ({len(ids)} tokens) plus --gen-tokens {speed.gen_tokens} exceeds the model's "
                       f"context size of {context} tokens; shorten them or pass --no-speed")
    return ids


def result_columns(loaded: Loaded) -> list[str]:
    """The CSV's header: the fixed columns, then those of the run's downstream tasks."""
    return COLUMNS + (task_columns(loaded.settings.tasks.metrics) if loaded.settings.tasks else [])


def scored_tokens(ids: torch.Tensor, windows: WindowSpec) -> int:
    return sum(w.scored for w in spec_windows(windows, len(ids)))


def removal_sets(config: RunConfig, loaded: Loaded, procs: Processes) -> tuple[list[Removal], Choice | None]:
    """The configurations to evaluate (baseline excluded), and a choosing mode's Choice.

    A choosing mode chooses on the main process only, and the others receive
    its removal sets and row columns: processes that chose on their own could
    break near-ties differently and work from different plans.
    """
    mode = MODES[config.mode]
    if loaded.planned is not None:
        return loaded.planned, None
    w = loaded.settings.windows
    calib = Calibration(loaded.model, lambda: calibration_ids(config.data, config.select.calib_tokens,
                                                              loaded.tokenizer, loaded.stream, loaded.cache_dir),
                        w.max_length, w.stride, w.batch_size, progress=loaded.settings.progress,
                        protocol=w.protocol, prefix_token=w.prefix_token, unit=config.select.unit,
                        patch=config.select.patch if config.select.choose_patched else "none")
    chosen: list[Choice] = []

    def choose() -> tuple[list[Removal], dict]:
        chosen.append(mode.choose(config, calib))
        return chosen[0].removals, chosen[0].extras

    removals, extras = procs.from_main(choose)
    return removals, (chosen[0] if chosen else Choice(removals, extras))


def announce(config: RunConfig, loaded: Loaded, removals: list[Removal], left: list[Removal]) -> None:
    """The run's size before any work: model, tokens and windows, the window length where it was capped,
    and on a CPU an estimate of what is ``left`` to evaluate (a resumed file's rows excluded)."""
    w, model, n_tokens = loaded.settings.windows, loaded.model, len(loaded.ids)
    n_windows = len(spec_windows(w, n_tokens))
    log.info(f"{config.data.model}: {num_blocks(model)} blocks, {count_parameters(model) / 1e6:.2f}M parameters, "
             f"{loaded.device.type}, {dtype_name(model)}")
    stride = f"stride {w.stride}, " if w.stride else ""
    log.info(f"Evaluating {plural(n_tokens, 'token')} in {plural(n_windows, 'window')} (max length {w.max_length}, "
             f"{stride}protocol {w.label}) for each of {plural(len(removals) + 1, 'configuration')} (baseline "
             "included)")
    context = context_size(model)
    if not config.windows.max_length and context > w.max_length:
        log.info(f"Windows of {w.max_length:,} tokens: the model's context is {context:,}, and the default window "
                 f"is at most {DEFAULT_MAX_LENGTH:,} (docs/measurement.md); --max-length {context} scores with the "
                 f"whole context at about {context / w.max_length:.0f} times the cost per scored token")
    if n_windows == 1 and n_tokens < w.max_length:
        log.info(f"All {n_tokens:,} tokens fit in one window of up to {w.max_length:,}: every token is scored "
                 "with all the text before it, and the stride plays no part")
    if not left:
        log.info(f"Nothing left to evaluate: {config.output.resume} holds every configuration")
        return
    if loaded.device.type == "cpu" and log.isEnabledFor(logging.INFO):  # the estimates cost a forward and a generation
        estimate_cpu_time(config, loaded, left)


def estimate_cpu_time(config: RunConfig, loaded: Loaded, left: list[Removal]) -> None:
    """A hint, where the passes over ``left`` will take more than CPU_SLOW_SECONDS, with a --max-tokens that
    would take about half that."""
    w, model, n_tokens = loaded.settings.windows, loaded.model, len(loaded.ids)
    seconds, batch = estimated_seconds(model, loaded.ids, left, w)
    s, pruned = config.speed, sum(1 for r in left if r)
    speed = (estimated_speed_seconds(model, loaded.prompt_ids, s.gen_tokens, s.runs, s.warmup, pruned)
             if s.enabled else 0.0)
    if seconds + speed <= CPU_SLOW_SECONDS:
        return
    # a first forward can include one-time set-up (allocations, kernel choice): time a second and keep the faster
    seconds, batch = min((seconds, batch), estimated_seconds(model, loaded.ids, left, w))
    if seconds + speed <= CPU_SLOW_SECONDS:
        return
    tests = f" and {minutes(speed)} of speed tests (from one timed generation)" if speed else ""
    hints = []
    fewer = quick_tokens(n_tokens, seconds, w.max_length)
    if fewer:
        hints.append(f"--max-tokens {fewer} ({minutes(seconds * fewer / n_tokens)} of passes) gives a quick estimate")
    if speed:
        hints.append("--no-speed, or fewer --speed-runs, shortens the speed tests")
    log.info(f"On a CPU this is slow: {minutes(seconds)} of perplexity passes for {plural(len(left), 'configuration')} "
             f"(from a window batch timed at {batch:.2f} s){tests}." + (f" {'; '.join(hints)}." if hints else ""))


def quick_tokens(n_tokens: int, seconds: float, max_length: int) -> int | None:
    """A --max-tokens, fewer than this run's, whose passes take about half of CPU_SLOW_SECONDS (two significant
    digits, at least one window); None where no such count is smaller than ``n_tokens``."""
    target = n_tokens * CPU_SLOW_SECONDS / 2 / seconds
    step = 10 ** max(0, int(math.log10(max(target, 1))) - 1)
    tokens = max(int(target) // step * step, min(max_length, n_tokens // 2), 2)
    return tokens if tokens <= n_tokens // 2 else None


def counted(measurements: Iterator, work: Work) -> Iterator:
    """Passes (measurement, --patch method) pairs through, adding the cost of their perplexity passes to ``work``."""
    for m, method in measurements:
        if m.work is not None:
            work.add(m.work)
        yield m, method


def patch_fitter(config: RunConfig, loaded: Loaded) -> Fitter | None:
    """What fits --patch's maps, on the calibration tokens the choosing modes take (None: no --patch)."""
    if config.select.patch == NONE:
        return None
    w = loaded.settings.windows
    return Fitter(loaded.model, lambda: calibration_ids(config.data, config.select.calib_tokens, loaded.tokenizer,
                                                        loaded.stream, loaded.cache_dir),
                  w.max_length, w.batch_size, progress=loaded.settings.progress)


@dataclass
class Record:
    """The results file of the run (main process only) and the sidecar's record of the run."""

    config: RunConfig
    out: ResultsFile | None
    info: dict

    def save(self) -> None:
        if self.out:
            write_sidecar(self.out.path, self.config.to_dict(), self.info)


def run(config: RunConfig) -> int:
    procs = current_processes(config.device)
    if not procs.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    procs.from_main(lambda: check_outputs(config))
    opened: list[ResultsFile | None] = [None]

    def open_and_read() -> list[dict]:
        opened[0] = open_results(config)
        return resumed_rows(config.output.resume) if config.output.resume else []

    resumed = procs.from_main(open_and_read)
    record = Record(config, opened[0], {"started": now(), "finished": None})
    try:
        status = run_stages(config, procs, resumed, record)
    except KitError:
        if record.out:
            record.out.discard()  # nothing measured: leave nothing behind
        raise
    except KeyboardInterrupt:
        record.info.update(finished=now(), interrupted=True)
        record.save()
        raise Interrupted(interrupted_message(record.out)) from None
    finally:
        if record.out:
            record.out.close()
    return status


def interrupted_message(out: ResultsFile | None) -> str:
    if out is None:
        return "nothing was saved (no --save_results)"
    return f"{len(read_rows(out.path))} rows in {out.path}; continue with --resume {out.path}"


def run_stages(config: RunConfig, procs: Processes, resumed: list[dict], record: Record) -> int:
    loaded = load(config, procs)
    if record.out:
        record.out.start(result_columns(loaded))
    w, device, dtype = loaded.settings.windows, loaded.device.type, dtype_name(loaded.model)
    # what the sidecar and --resume compare; without a CSV (or off the main process) there is nothing to compare
    identity = (run_identity(config, w, device, dtype, getattr(loaded.model.config, "_commit_hash", None))
                if record.out else {})
    if config.output.resume:
        record.info["baseline"] = procs.from_main(lambda: check_same_experiment(
            config.output.resume, resumed, identity, scored_tokens(loaded.ids, w), w.label))
    record.info.update(identity=identity, device=device, device_name=device_name(loaded.device), dtype=dtype,
                       stream_tokens=len(loaded.ids), max_length=w.max_length, stride=w.stride,
                       max_length_source=length_source(config, context_size(loaded.model)), protocol=w.label,
                       prefix_token=w.prefix_token, configurations_evaluated=0, tokens_evaluated=0)
    if loaded.settings.tasks:  # lm-eval's task versions, shots and examples, filled in as configurations are scored
        record.info["tasks"] = loaded.settings.tasks.info
    record.save()  # before the first forward pass: a crashed run's CSV has its sidecar
    out = config.output
    if out.quiet and procs.is_main and not (out.writes_csv or out.save_model or out.save_gguf):  # inputs checked
        log.warning("--quiet without --save_results prints no results and keeps no file: this run's measurements "
                    "would be lost; add --save_results (or drop --quiet)")
    removals, choice = removal_sets(config, loaded, procs)
    if choice is not None and choice.info:
        record.info["choosing"] = choice.info  # what choosing cost, how it ranked, how its picks held
    shard = config.output.shard
    if shard:
        record.info["plan_size"] = len(removals)
        mine = share(removals, shard.index, shard.count)
        log.info(f"Shard {shard}: {len(mine)} of the sweep's {len(removals)} configurations, and the baseline")
        removals = mine
    configs = configurations(config.select.patch, removals, choice.patched if choice else None, loaded.model)
    fitter = patch_fitter(config, loaded)
    if fitter:
        record.info["patch"] = fitter.info  # filled in as maps are fitted
    done = {config_key(row_removal(r), r.get("patch")) for r in resumed}
    announce(config, loaded, removals, [r for r, method in configs if config_key(r, method) not in done])
    rows = measure_rows(config, loaded, procs, configs, resumed, choice, record, fitter)
    if not procs.is_main:
        return 0
    mode_report = choice.report(rows) if choice and choice.report else None
    print_summary(config, rows, mode_report, with_table=not choice or choice.sweep_table)
    method = rows[-1].get("patch") or NONE
    patch = fitter(row_removal(rows[-1]), method) if fitter and method != NONE else None
    deliver(config, loaded.model, loaded.tokenizer, rows, loaded.ids, loaded.settings, loaded.heal, loaded.train_ids,
            patch, fitter.info["calibration"] if patch else None)
    if record.out:
        record.info.update(finished=now(), mode_report=mode_report)
        record.save()
        log.warning(f"Results written to {record.out.path}")
        log.warning(f"Run metadata written to {os.path.splitext(record.out.path)[0]}.json")
        write_outputs(read_rows(record.out.path), record.out.path, plot=config.output.plot, mode_report=mode_report,
                      first_header=MODES[config.mode].first_header)
    return 0


def check_baseline(row: dict) -> None:
    """A baseline without a finite perplexity makes every change column meaningless: stop before writing it."""
    if not math.isfinite(row["perplexity"]):
        raise KitError(f"the unpruned model's perplexity is {row['perplexity']} on this text: its outputs are not "
                       "finite (NaN or infinite weights, or an overflow in half precision: try --dtype float32), so "
                       "no change against it can be measured")


def pass_checkpoint(config: RunConfig, record: Record, procs: Processes) -> str | None:
    """Where the perplexity passes save their state: beside the results file, for a single process (several
    processes each hold a share, which a resumed run shares out anew). A new file's name was free, so a
    checkpoint beside it is a leftover of a file removed since, and goes."""
    if record.out is None or procs.count > 1:
        return None
    path = pass_checkpoint_path(record.out.path)
    if not config.output.resume and os.path.exists(path):
        os.remove(path)
    return path


def measure_rows(config: RunConfig, loaded: Loaded, procs: Processes, configs: list[tuple[Removal, str]],
                 resumed: list[dict], choice: Choice | None, record: Record, fitter: Fitter | None) -> list[dict]:
    """Every configuration's row, in plan order, each written as it arrives.

    ``configs`` are (removal set, --patch method) pairs, the baseline first
    (pruning.compensation.configurations); ``fitter`` fits the patched ones.
    """
    model, device, info = loaded.model, loaded.device, record.info
    settings = replace(loaded.settings, checkpoint=pass_checkpoint(config, record, procs))
    context = {"mode": config.mode, "model": config.data.model, "dataset": config.data.dataset,
               "device": device.type, "dtype": dtype_name(model), "protocol": loaded.settings.windows.label}
    done = {config_key(row_removal(r), r.get("patch")): r for r in resumed}
    work = Work()
    base = done.get(config_key(()))
    # The baseline goes into the sweep's own pass (its chain of blocks is every other configuration's
    # prefix), first, so its row arrives before any row that needs it for the change columns.
    candidates = configs[1:] if base else configs
    todo = [c for c in candidates if config_key(*c) not in done]
    if config.output.resume or procs.count > 1:
        skipped = f" ({len(candidates) - len(todo)} already in {config.output.resume})" if config.output.resume else ""
        workers = f" over {procs.count} processes" if procs.count > 1 else ""
        log.info(f"{len(todo)} configurations to evaluate{skipped}{workers}")
    mine = share(todo, procs.index, procs.count)
    bar = progress_bar(total=len(todo), desc="configurations", unit="cfg",
                   disable=config.output.quiet or len(todo) < 2 or not procs.is_main)
    extras = choice.extras if choice else {}
    # the plain sets in the shared-prefix sweep, then each patched one on its own
    plain = ((m, NONE) for m in measure_all(model, loaded.ids, loaded.prompt_ids,
                                            [r for r, method in mine if method == NONE], settings))
    patched = measure_patched(model, loaded.ids, loaded.prompt_ids, [c for c in mine if c[1] != NONE],
                              loaded.settings, fitter)
    measurements = counted(itertools.chain(plain, patched), work)
    measured = (to_row(m, {**context, "patch": method, **extras.get(canonical(m.removed), {})})
                for m, method in measurements)
    rows = dict(done)
    # Each process measures its share; every row reaches every process, in order, and the main
    # process writes it. Process 0's share starts with the baseline, so it is the first row of all.
    for batch in in_rounds(procs, measured):
        for row in batch:
            base = base or row
            row = with_changes(row, base)
            rows[config_key(row_removal(row), row["patch"])] = row
            info["configurations_evaluated"] += 1
            info["tokens_evaluated"] += row["eval_tokens"]
            if not row_removal(row):
                check_baseline(row)
            if record.out:
                record.out.write(row)
                if not row_removal(row):  # what --resume checks the file's baseline row against
                    info["baseline"] = {"perplexity": row["perplexity"], "params": row["params"]}
                record.save()  # its counters match the file's rows even after a kill -9
            bar.update()
    bar.close()
    if work.configurations:
        log.info(f"Perplexity work: {work.summary()}")
    info["work"] = work.as_dict()
    return [rows[config_key(*c)] for c in configs]
