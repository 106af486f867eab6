"""One evaluating run of the kit, as named stages: check the outputs, load,
plan (or choose), measure and write. main.py only parses; runner.run
dispatches here for every mode that evaluates a model."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm

from config import HealSpec, RunConfig
from evaluation.engine import Work
from evaluation.params import count_parameters
from evaluation.windows import resolve_windows, spec_windows
from evaluation.sweep import EvalSettings, measure_all
from export.checkpoint import deliver
from export.heal import healing_inputs
from models.families import check_prunable, num_blocks
from models.loading import dtype_name, load_model, resolve_device
from models.removal import context_size
from models.units import Removal
from pruning.calibration import Calibration, calibration_ids
from pruning.choice import Choice
from pruning.modes import MODES, saving_modes
from reporting.csvfile import ResultsFile, check_columns, read_rows, results_path
from reporting.markdown import write_outputs
from reporting.schema import to_row, with_changes
from reporting.sidecar import write_sidecar
from runner.processes import Processes, current_processes, in_rounds, share
from runner.summary import print_summary
from utils.cache import cached_token_ids, default_cache_dir
from utils.data import tokenize
from utils.errors import KitError
from utils.metadata import device_name, now
from utils.text import removal_key

log = logging.getLogger("gpt2-pruning-kit")

# Beyond this many tokens a CPU evaluation takes minutes per configuration.
CPU_SLOW_TOKENS = 50_000


@dataclass(frozen=True)
class Loaded:
    """What the load stage hands the others: the model, its evaluation tokens and resolved settings."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    stream: torch.Tensor  # the dataset's whole token stream
    ids: torch.Tensor  # the evaluated tokens (the first --max-tokens of the stream)
    prompt_ids: torch.Tensor | None
    settings: EvalSettings
    heal: HealSpec | None  # resolved, or None without --heal-steps
    train_ids: torch.Tensor | None
    cache_dir: str | None


def check_outputs(config: RunConfig) -> None:
    """Options that the mode cannot honour, and a --save-model directory that is not free."""
    mode, out = MODES[config.mode], config.output
    if config.heal.steps and not mode.saves:
        raise KitError(f"--heal-steps works with --mode {', '.join(saving_modes())}, not {config.mode}")
    if out.save_model is None:
        return
    if not mode.saves:
        raise KitError(f"--save-model works with --mode {', '.join(saving_modes())}, not {config.mode}")
    if os.path.exists(out.save_model) and (not os.path.isdir(out.save_model) or os.listdir(out.save_model)):
        raise KitError(f"--save-model directory '{out.save_model}' exists and is not empty; choose a new one")


def resumed_rows(config: RunConfig) -> list[dict]:
    path = config.output.resume
    if not path:
        return []
    rows = read_rows(path)
    check_columns(path)
    for row in rows:
        for key in ("model", "dataset"):
            if str(row.get(key)) != str(getattr(config.data, key)):
                raise KitError(f"--resume file '{path}' holds results for {key} '{row.get(key)}', "
                               f"not '{getattr(config.data, key)}'")
    return rows


def load(config: RunConfig, procs: Processes) -> Loaded:
    """Model, tokens, prompt and healing text, every input checked before any measurement."""
    device = resolve_device(config.device)
    if procs.device is not None and config.device in ("auto", "cuda"):
        device = procs.device  # one accelerator per process
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.data.model, device, config.dtype)
    if MODES[config.mode].removes:
        check_prunable(model)
    windows = resolve_windows(config.windows, context_size(model), tokenizer)
    data = config.data
    cache_dir = None if data.no_cache else (data.cache_dir or str(default_cache_dir()))
    stream = cached_token_ids(tokenizer, data.dataset, data.split, data.text_column, cache_dir)
    ids = stream[: data.max_tokens] if data.max_tokens else stream
    if len(ids) < 2:
        raise KitError("--max-tokens must be at least 2")
    prompt_ids = None
    if config.speed.enabled:
        if not config.speed.prompt.strip():
            raise KitError("--prompt is empty")
        prompt_ids = tokenize(tokenizer, config.speed.prompt, "--prompt", min_tokens=1)
    heal, train_ids = healing_inputs(config.heal, data.dataset, data.text_column, model, tokenizer, ids,
                                     context_size(model), cache_dir)
    settings = EvalSettings(windows, config.speed, progress=not config.output.quiet and procs.is_main)
    return Loaded(model, tokenizer, device, stream, ids, prompt_ids, settings, heal, train_ids, cache_dir)


def check_resumed(config: RunConfig, loaded: Loaded, resumed: list[dict]) -> None:
    """Rows of a --resume file compare with this run's only if measured the same way."""
    w = loaded.settings.windows
    scored = sum(x.scored for x in spec_windows(w, len(loaded.ids)))
    mismatched = [r for r in resumed if r.get("eval_tokens") != scored]
    if mismatched:
        raise KitError(f"--resume file '{config.output.resume}' was evaluated on {mismatched[0].get('eval_tokens')} "
                       f"tokens, this run scores {scored}: use the same --dataset, --max-tokens, --max-length and "
                       "--stride, --protocol")
    for key, value in (("device", loaded.device.type), ("dtype", dtype_name(loaded.model)), ("protocol", w.label)):
        other = next((r[key] for r in resumed if r.get(key) != value), None)
        if other is not None:
            raise KitError(f"--resume file '{config.output.resume}' was measured with {key} {other}, this run uses "
                           f"{value}: its latencies and perplexities would not compare with this run's")


def plan(config: RunConfig, loaded: Loaded) -> tuple[list[Removal], Choice | None]:
    """The configurations to evaluate (baseline excluded), and a choosing mode's Choice."""
    mode, n = MODES[config.mode], num_blocks(loaded.model)
    if mode.plan:
        return mode.plan(config, n), None
    w = loaded.settings.windows
    calib = Calibration(loaded.model, lambda: calibration_ids(config.data, config.select.calib_tokens,
                                                              loaded.tokenizer, loaded.stream, loaded.cache_dir),
                        w.max_length, w.stride, w.batch_size, progress=loaded.settings.progress,
                        protocol=w.protocol, prefix_token=w.prefix_token)
    choice = mode.choose(config, calib)
    return choice.removals, choice


def announce(config: RunConfig, loaded: Loaded, removals: list[Removal]) -> None:
    w, model = loaded.settings.windows, loaded.model
    n_windows = len(spec_windows(w, len(loaded.ids)))
    log.info(f"{config.data.model}: {num_blocks(model)} blocks, {count_parameters(model) / 1e6:.2f}M parameters, "
             f"{loaded.device.type}, {dtype_name(model)}")
    stride = f"stride {w.stride}, " if w.stride else ""
    log.info(f"Evaluating {len(loaded.ids):,} tokens in {n_windows:,} windows (max length {w.max_length}, {stride}"
             f"protocol {w.label}) for each of {len(removals) + 1} configurations (baseline included)")
    if loaded.device.type == "cpu" and len(loaded.ids) > CPU_SLOW_TOKENS:
        log.info("On a CPU this is slow: the full WikiText-2 test split takes distilgpt2 about half an hour per "
                 "configuration. Use --max-tokens (e.g. --max-tokens 20000) for a quick estimate.")


def counted(rows: Iterator, work: Work) -> Iterator:
    """Passes measurements through, adding the cost of their perplexity passes to ``work``."""
    for m in rows:
        if m.work is not None:
            work.add(m.work)
        yield m


def run(config: RunConfig) -> int:
    started = now()
    procs = current_processes(config.device)
    if not procs.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    procs.from_main(lambda: check_outputs(config))
    resumed = procs.from_main(lambda: resumed_rows(config))
    loaded = load(config, procs)
    check_resumed(config, loaded, resumed)
    # Choosing blocks costs calibration passes, so it starts once every input has been checked.
    removals, choice = plan(config, loaded)
    shard = config.output.shard
    if shard:
        mine = share(removals, shard.index, shard.count)
        log.info(f"Shard {shard}: {len(mine)} of the sweep's {len(removals)} configurations, and the baseline")
        removals = mine
    announce(config, loaded, removals)

    out = open_results(config, procs)
    rows, run_info = measure_rows(config, loaded, procs, removals, resumed, choice, out, started)
    if not procs.is_main:
        return 0
    print_summary(config, rows, choice)
    deliver(config, loaded.model, loaded.tokenizer, rows, loaded.ids, loaded.settings, loaded.heal, loaded.train_ids)
    if out:
        run_info["finished"] = now()
        log.warning(f"Results written to {out.path}")
        log.warning(f"Run metadata written to {write_sidecar(out.path, config.to_dict(), run_info)}")
        write_outputs(read_rows(out.path), out.path, plot=config.output.plot)
    return 0


def open_results(config: RunConfig, procs: Processes) -> ResultsFile | None:
    """The results file the main process writes (None: no CSV asked for, or another process)."""
    out, shard = config.output, config.output.shard
    if not out.writes_csv or not procs.is_main:
        return None
    # Shards of a Slurm array may start in the same second: their names differ.
    name = f"{config.mode}-shard{shard.index}of{shard.count}" if shard else config.mode
    path = out.resume or results_path(out.output_dir, config.data.model, name)
    return ResultsFile(path, exclusive=not out.resume)


def measure_rows(config: RunConfig, loaded: Loaded, procs: Processes, removals: list[Removal],
                 resumed: list[dict], choice: Choice | None, out: ResultsFile | None,
                 started: str) -> tuple[list[dict], dict]:
    """Every configuration's row, in plan order, written as it arrives; and the sidecar's record of the run."""
    model, device = loaded.model, loaded.device
    context = {"mode": config.mode, "model": config.data.model, "dataset": config.data.dataset,
               "device": device.type, "dtype": dtype_name(model), "protocol": loaded.settings.windows.label}
    done = {removal_key(r["removed_layers"]): r for r in resumed}
    w = loaded.settings.windows
    # The sidecar's record of this run; other parts of the run add to it (e.g. "work").
    run_info = {"started": started, "finished": None, "device": device.type, "device_name": device_name(device),
                "dtype": dtype_name(model), "stream_tokens": len(loaded.ids), "max_length": w.max_length,
                "stride": w.stride, "protocol": w.label, "prefix_token": w.prefix_token,
                "configurations_evaluated": 0, "tokens_evaluated": 0}
    work = Work()
    base = done.get(removal_key(()))
    # The baseline goes into the sweep's own pass (its chain of blocks is every other configuration's
    # prefix), first, so its row arrives before any row that needs it for the change columns.
    configs = removals if base else [(), *removals]
    todo = [r for r in configs if removal_key(r) not in done]
    if config.output.resume or procs.count > 1:
        skipped = f" ({len(configs) - len(todo)} already in {config.output.resume})" if config.output.resume else ""
        workers = f" over {procs.count} processes" if procs.count > 1 else ""
        log.info(f"{len(todo)} configurations to evaluate{skipped}{workers}")
    mine = share(todo, procs.index, procs.count)
    bar = tqdm(total=len(todo), desc="configurations", unit="cfg",
               disable=config.output.quiet or len(todo) < 2 or not procs.is_main)
    extras = choice.extras if choice else {}
    measurements = counted(measure_all(model, loaded.ids, loaded.prompt_ids, mine, loaded.settings), work)
    measured = (to_row(m, {**context, **extras.get(tuple(sorted(m.removed)), {})}) for m in measurements)
    rows = dict(done)
    # Each process measures its share; every row reaches every process, in order, and the main
    # process writes it. Process 0's share starts with the baseline, so it is the first row of all.
    for batch in in_rounds(procs, measured):
        for row in batch:
            base = base or row
            row = with_changes(row, base)
            rows[removal_key(row["removed_layers"])] = row
            run_info["configurations_evaluated"] += 1
            run_info["tokens_evaluated"] += row["eval_tokens"]
            if out:
                out.write(row)
                if run_info["configurations_evaluated"] == 1:  # a crashed sweep's CSV still has its sidecar
                    write_sidecar(out.path, config.to_dict(), run_info)
            bar.update()
    bar.close()
    if work.configurations:
        log.info(f"Perplexity work: {work.summary()}")
    run_info["work"] = work.as_dict()
    return [rows[removal_key(r)] for r in [(), *removals]], run_info
