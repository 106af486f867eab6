"""One run of the kit: load, plan, evaluate, report. main.py only parses."""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from datetime import datetime
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from evaluation.engine import Work
from evaluation.perplexity import sliding_windows
from evaluation.params import count_parameters
from evaluation.sweep import EvalSettings, Measurement, measure_all
from pruning.blocks import context_size, num_blocks
from pruning.choosers import CHOOSERS
from pruning.heal import healing_inputs
from pruning.importance import Calibration, calibration_ids
from pruning.strategies import PLANNERS
from utils.cache import cached_token_ids, default_cache_dir
from utils.data import tokenize
from utils.distributed import current_processes, in_rounds, merge_rows, share
from utils.errors import KitError
from utils.export import deliver
from utils.metadata import device_name, now, write_sidecar
from utils.models import dtype_name, load_model, resolve_device
from utils.report import write_outputs
from utils.results import (ResultsFile, check_columns, comparison_table, observations, read_rows, removal_key,
                           results_path, sweep_table, with_changes)

log = logging.getLogger("gpt2-pruning-kit")

# Modes that end in one chosen configuration (the last row), which can be healed and saved.
SAVE_MODEL_MODES = ("custom", "random", "importance", "greedy", "beam")
# Beyond this many tokens a CPU evaluation takes minutes per configuration.
CPU_SLOW_TOKENS = 50_000


def window_settings(args: Namespace, model) -> tuple[int, int]:
    limit = context_size(model)
    max_length = args.max_length or limit
    if max_length > limit:
        raise KitError(f"--max-length {max_length} exceeds the model's context size of {limit} tokens")
    stride = args.stride or max(1, min(512, max_length // 2))
    if stride > max_length:
        raise KitError(f"--stride {stride} is larger than --max-length {max_length}")
    return max_length, stride


def check_save_dir(path: str | None, mode: str, heal_steps: int = 0) -> None:
    if heal_steps and mode not in SAVE_MODEL_MODES:
        raise KitError(f"--heal-steps works with --mode {', '.join(SAVE_MODEL_MODES)}, not {mode}")
    if path is None:
        return
    if mode not in SAVE_MODEL_MODES:
        raise KitError(f"--save-model works with --mode {', '.join(SAVE_MODEL_MODES)}, not {mode}")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise KitError(f"--save-model directory '{path}' exists and is not empty; choose a new one")


def resumed_rows(args: Namespace) -> list[dict]:
    if not args.resume:
        return []
    rows = read_rows(args.resume)
    check_columns(args.resume)
    for row in rows:
        for key in ("model", "dataset"):
            if str(row.get(key)) != str(getattr(args, key)):
                raise KitError(f"--resume file '{args.resume}' holds results for {key} '{row.get(key)}', "
                               f"not '{getattr(args, key)}'")
    return rows


def to_row(m: Measurement, context: dict) -> dict:
    lat = m.latency
    row = {
        **context,
        "removed_layers": list(m.removed),
        "num_removed": len(m.removed),
        "num_layers": m.num_layers,
        "perplexity": m.ppl.perplexity,
        "params": m.params,
        "params_m": m.params / 1e6,
        "latency_ms": lat.latency_ms if lat else None,
        "latency_iqr_ms": lat.latency_iqr_ms if lat else None,
        "prefill_ms": lat.prefill_ms if lat else None,
        "tokens_per_s": lat.tokens_per_s if lat else None,
        "eval_tokens": m.ppl.tokens,
        "timestamp": datetime.now().isoformat(timespec="seconds"),
    }
    return row


def counted(measurements: Iterable[Measurement], work: Work) -> Iterator[Measurement]:
    """Passes measurements through, adding the cost of their perplexity passes to ``work``."""
    for m in measurements:
        if m.work is not None:
            work.add(m.work)
        yield m


def run(args: Namespace) -> int:
    started = now()
    procs = current_processes(args.device)
    if not procs.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    procs.from_main(lambda: check_save_dir(args.save_model, args.mode, args.heal_steps))
    resumed = procs.from_main(lambda: resumed_rows(args))
    device = resolve_device(args.device)
    if procs.device is not None and args.device in ("auto", "cuda"):
        device = procs.device  # one accelerator per process
    torch.manual_seed(args.seed)

    model, tokenizer = load_model(args.model, device, args.dtype)
    n = num_blocks(model)
    removals = PLANNERS[args.mode](args, n) if args.mode in PLANNERS else []
    max_length, stride = window_settings(args, model)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    stream = cached_token_ids(tokenizer, args.dataset, args.split, args.text_column, cache_dir)
    ids = stream[: args.max_tokens] if args.max_tokens else stream
    if len(ids) < 2:
        raise KitError("--max-tokens must be at least 2")
    prompt_ids = None
    if not args.no_speed:
        if not args.prompt.strip():
            raise KitError("--prompt is empty")
        prompt_ids = tokenize(tokenizer, args.prompt, "--prompt", min_tokens=1)
    heal_settings, train_ids = healing_inputs(args, model, tokenizer, ids, context_size(model), cache_dir)

    settings = EvalSettings(max_length, stride, args.batch_size, not args.no_speed, args.speed_runs,
                            args.speed_warmup, args.gen_tokens, progress=not args.quiet and procs.is_main)
    windows = sliding_windows(len(ids), max_length, stride)
    n_windows = len(windows)
    scored = sum(w.end - w.first_target for w in windows)
    mismatched = [r for r in resumed if r.get("eval_tokens") != scored]
    if mismatched:
        raise KitError(f"--resume file '{args.resume}' was evaluated on {mismatched[0].get('eval_tokens')} tokens, "
                       f"this run scores {scored}: use the same --dataset, --max-tokens, --max-length and --stride")
    for key, value in (("device", device.type), ("dtype", dtype_name(model))):
        other = next((r[key] for r in resumed if r.get(key) != value), None)
        if other is not None:
            raise KitError(f"--resume file '{args.resume}' was measured with {key} {other}, this run uses {value}: "
                           f"its latencies and perplexities would not compare with this run's")

    # Choosing blocks costs calibration passes, so it starts once every input has been checked.
    choice = None
    if args.mode in CHOOSERS:
        calib = Calibration(model, lambda: calibration_ids(args, tokenizer, stream, cache_dir), max_length, stride,
                            args.batch_size, progress=not args.quiet)
        choice = CHOOSERS[args.mode](args, calib)
        removals = choice.removals
    if args.shard:
        mine = share(removals, args.shard.index, args.shard.count)
        log.info(f"Shard {args.shard}: {len(mine)} of the sweep's {len(removals)} configurations, and the baseline")
        removals = mine
    log.info(f"{args.model}: {n} blocks, {count_parameters(model) / 1e6:.2f}M parameters, "
             f"{device.type}, {dtype_name(model)}")
    log.info(f"Evaluating {len(ids):,} tokens in {n_windows:,} windows (max length {max_length}, stride {stride}) "
             f"for each of {len(removals) + 1} configurations (baseline included)")
    if device.type == "cpu" and len(ids) > CPU_SLOW_TOKENS:
        log.info("On a CPU this is slow: the full WikiText-2 test split takes distilgpt2 about half an hour per "
                 "configuration. Use --max-tokens (e.g. --max-tokens 20000) for a quick estimate.")

    # --plot draws from the CSV, so it writes one too (see README, "Figures and reports").
    save = args.save_results or args.plot
    # Shards of a Slurm array may start in the same second: their names differ.
    name = f"{args.mode}-shard{args.shard.index}of{args.shard.count}" if args.shard else args.mode
    out_path = args.resume or (results_path(args.output_dir, args.model, name) if save else None)
    out = ResultsFile(out_path, exclusive=not args.resume) if out_path and procs.is_main else None
    context = {"mode": args.mode, "model": args.model, "dataset": args.dataset, "device": device.type,
               "dtype": dtype_name(model)}
    done = {removal_key(r["removed_layers"]): r for r in resumed}
    # The sidecar's record of this run; other parts of the run add to it (e.g. "work").
    run_info = {"started": started, "finished": None, "device": device.type, "device_name": device_name(device),
                "dtype": dtype_name(model), "stream_tokens": len(ids), "max_length": max_length, "stride": stride,
                "configurations_evaluated": 0, "tokens_evaluated": 0}
    work = Work()

    base = done.get(removal_key(()))
    # The baseline goes into the sweep's own pass (its chain of blocks is every other configuration's
    # prefix), first, so its row arrives before any row that needs it for the change columns.
    configs = removals if base else [(), *removals]
    todo = [r for r in configs if removal_key(r) not in done]
    if args.resume or procs.count > 1:
        skipped = f" ({len(configs) - len(todo)} already in {args.resume})" if args.resume else ""
        workers = f" over {procs.count} processes" if procs.count > 1 else ""
        log.info(f"{len(todo)} configurations to evaluate{skipped}{workers}")
    mine = share(todo, procs.index, procs.count)
    bar = tqdm(total=len(todo), desc="configurations", unit="cfg",
               disable=args.quiet or len(todo) < 2 or not procs.is_main)
    extras = choice.extras if choice else {}
    measurements = counted(measure_all(model, ids, prompt_ids, mine, settings), work)
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
                    write_sidecar(out.path, args, run_info)
            bar.update()
    bar.close()
    rows = [rows[removal_key(r)] for r in [(), *removals]]
    if work.configurations:
        log.info(f"Perplexity work: {work.summary()}")
    run_info["work"] = work.as_dict()
    if not procs.is_main:
        return 0

    report(args, rows, choice)
    deliver(args, model, tokenizer, rows, ids, settings, heal_settings, train_ids)
    if out:
        run_info["finished"] = now()
        log.warning(f"Results written to {out.path}")
        log.warning(f"Run metadata written to {write_sidecar(out.path, args, run_info)}")
        write_outputs(read_rows(out.path), out.path, plot=args.plot)
    return 0


def merge(args: Namespace) -> int:
    """--mode merge: the shard files of one sweep as one results file."""
    tables = [(path, read_rows(path)) for path in args.inputs]
    rows = merge_rows(tables)
    base = rows[0]
    rows = [with_changes(r, base) for r in rows]
    out = ResultsFile(results_path(args.output_dir, str(base["model"]), str(base["mode"])))
    for row in rows:
        out.write(row)
    log.info(f"Merged {len(rows)} rows from {len(tables)} files")
    report(args, rows)
    log.warning(f"Results written to {out.path}")
    log.warning(f"Run metadata written to {write_sidecar(out.path, args, {'started': now(), 'merged_from': list(args.inputs)})}")
    write_outputs(rows, out.path, plot=args.plot)
    return 0


def report(args: Namespace, rows: list[dict], choice=None) -> None:
    if args.quiet:
        return
    if args.mode == "random" and len(rows) == 2:
        print(f"\nRandom Layer Removal (seed {args.seed}, removed blocks {rows[1]['removed_layers']})\n")
        print(comparison_table(rows[0], rows[1]))
    if choice and choice.report:
        print("\n" + choice.report(rows))
    if not choice or choice.sweep_table:
        print("\n" + sweep_table(rows))
    notes = observations(rows)
    if notes:
        print("\nKey observations:\n" + "\n".join(f"- {n}" for n in notes))
