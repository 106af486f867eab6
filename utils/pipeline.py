"""One run of the kit: load, plan, evaluate, report. main.py only parses."""

from __future__ import annotations

import logging
import os
import time
from argparse import Namespace
from datetime import datetime

import torch

from evaluation.engine import Work
from evaluation.perplexity import sliding_windows
from evaluation.sweep import EvalSettings, Measurement, measure_all
from pruning.blocks import num_blocks, removed_blocks
from pruning.strategies import PLANNERS
from utils.cache import cached_token_ids, default_cache_dir
from utils.data import tokenize
from utils.errors import KitError
from utils.models import dtype_name, load_model, resolve_device
from utils.results import (ResultsFile, change_pct, comparison_table, observations, read_rows, removal_key,
                           results_path, sweep_table)
from tqdm.auto import tqdm

log = logging.getLogger("gpt2-pruning-kit")

SAVE_MODEL_MODES = ("custom", "random")
# Beyond this many tokens a CPU evaluation takes minutes per configuration.
CPU_SLOW_TOKENS = 50_000


def context_size(model) -> int:
    return getattr(model.config, "n_positions", None) or model.config.max_position_embeddings


def window_settings(args: Namespace, model) -> tuple[int, int]:
    limit = context_size(model)
    max_length = args.max_length or limit
    if max_length > limit:
        raise KitError(f"--max-length {max_length} exceeds the model's context size of {limit} tokens")
    stride = args.stride or max(1, min(512, max_length // 2))
    if stride > max_length:
        raise KitError(f"--stride {stride} is larger than --max-length {max_length}")
    return max_length, stride


def check_save_dir(path: str | None, mode: str) -> None:
    if path is None:
        return
    if mode not in SAVE_MODEL_MODES:
        raise KitError(f"--save-model works with --mode {' or '.join(SAVE_MODEL_MODES)}, not {mode}")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise KitError(f"--save-model directory '{path}' exists and is not empty; choose a new one")


def resumed_rows(args: Namespace) -> list[dict]:
    if not args.resume:
        return []
    rows = read_rows(args.resume)
    for row in rows:
        for key in ("model", "dataset"):
            if str(row.get(key)) != str(getattr(args, key)):
                raise KitError(f"--resume file '{args.resume}' holds results for {key} '{row.get(key)}', "
                               f"not '{getattr(args, key)}'")
    return rows


def to_row(m: Measurement, base: dict | None, context: dict) -> dict:
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
    return with_changes(row, base or row)


def with_changes(row: dict, base: dict) -> dict:
    return {**row,
            "ppl_change_pct": change_pct(row["perplexity"], base["perplexity"]),
            "params_change_pct": change_pct(row["params"], base["params"]),
            "speed_change_pct": change_pct(row["latency_ms"], base["latency_ms"])}


def run(args: Namespace) -> int:
    run_info: dict = {}
    check_save_dir(args.save_model, args.mode)
    resumed = resumed_rows(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    model, tokenizer = load_model(args.model, device, args.dtype)
    n = num_blocks(model)
    removals = PLANNERS[args.mode](args, n)
    max_length, stride = window_settings(args, model)

    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    ids = cached_token_ids(tokenizer, args.dataset, args.split, args.text_column, cache_dir)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
        if len(ids) < 2:
            raise KitError("--max-tokens must be at least 2")
    prompt_ids = tokenize(tokenizer, args.prompt) if args.prompt.strip() else None
    if not args.no_speed and prompt_ids is None:
        raise KitError("--prompt is empty")

    settings = EvalSettings(max_length, stride, args.batch_size, not args.no_speed, args.speed_runs,
                            args.speed_warmup, args.gen_tokens, progress=not args.quiet)
    windows = sliding_windows(len(ids), max_length, stride)
    n_windows = len(windows)
    scored = sum(w.end - w.first_target for w in windows)
    mismatched = [r for r in resumed if r.get("eval_tokens") != scored]
    if mismatched:
        raise KitError(f"--resume file '{args.resume}' was evaluated on {mismatched[0].get('eval_tokens')} tokens, "
                       f"this run scores {scored}: use the same --dataset, --max-tokens, --max-length and --stride")
    log.info(f"{args.model}: {n} blocks, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"{device.type}, {dtype_name(model)}")
    log.info(f"Evaluating {len(ids):,} tokens in {n_windows:,} windows (max length {max_length}, stride {stride}) "
             f"for each of {len(removals) + 1} configurations (baseline included)")
    if device.type == "cpu" and len(ids) > CPU_SLOW_TOKENS:
        log.info("On a CPU this is slow: the full WikiText-2 test split takes distilgpt2 about half an hour per "
                 "configuration. Use --max-tokens (e.g. --max-tokens 20000) for a quick estimate.")

    out_path = args.resume or (results_path(args.output_dir, args.model, args.mode) if args.save_results else None)
    out = ResultsFile(out_path, exclusive=not args.resume) if out_path else None
    context = {"mode": args.mode, "model": args.model, "dataset": args.dataset, "device": device.type,
               "dtype": dtype_name(model)}
    done = {removal_key(r["removed_layers"]): r for r in resumed}
    work = Work()

    def evaluate(removals, base):
        """Rows for ``removals``, taking those already in a resumed file from it."""
        rows = {removal_key(r): done[removal_key(r)] for r in removals if removal_key(r) in done}
        todo = [r for r in removals if removal_key(r) not in done]
        bar = tqdm(total=len(todo), desc="configurations", unit="cfg", disable=args.quiet or len(todo) < 2)
        for m in measure_all(model, ids, prompt_ids, todo, settings, work):
            row = to_row(m, base, context)
            rows[removal_key(m.removed)] = row
            if out:
                out.write(row)
            bar.update()
        bar.close()
        return [rows[removal_key(r)] for r in removals]

    start = time.perf_counter()
    base = evaluate([()], None)[0]
    base_seconds = time.perf_counter() - start
    if removals:
        todo = sum(removal_key(r) not in done for r in removals)
        skipped = f" ({len(removals) - todo} already in {args.resume})" if args.resume else ""
        log.info(f"{len(removals)} configurations to evaluate{skipped}; estimated at most "
                 f"{base_seconds * todo / 60:.1f} min (the baseline took {base_seconds:.1f} s)")
    rows = [base] + [with_changes(r, base) for r in evaluate(removals, base)]
    if work.configurations:
        log.info(f"Perplexity work: {work.summary()}")
    run_info["work"] = work.as_dict()

    report(args, rows)
    if args.save_model:
        with removed_blocks(model, rows[-1]["removed_layers"]) as pruned:
            pruned.save_pretrained(args.save_model)
        tokenizer.save_pretrained(args.save_model)
        log.info(f"Pruned model written to {args.save_model}")
    if out:
        log.warning(f"Results written to {out.path}")
    return 0


def report(args: Namespace, rows: list[dict]) -> None:
    if args.mode == "random" and len(rows) == 2:
        print(f"\nRandom Layer Removal (seed {args.seed}, removed blocks {rows[1]['removed_layers']})\n")
        print(comparison_table(rows[0], rows[1]))
    print("\n" + sweep_table(rows))
    notes = observations(rows)
    if notes:
        print("\nKey observations:\n" + "\n".join(f"- {n}" for n in notes))
