"""The model card of an exported checkpoint: the facts as data (build_report,
written as pruning_report.json) and as the README.md a person reads."""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime
from typing import Any, Sequence

import torch
import transformers
from huggingface_hub import ModelCardData

from config import DataSpec, RunConfig, WindowSpec
from evaluation.latency import PREFILL_TOKENS
from models.loading import looks_local
from models.units import kept_blocks, removed_whole, row_removal, unit_names
from reporting.schema import change_pct
from utils.data import is_local_dataset


def measured(row: dict) -> dict:
    """The numbers of one result row that the model card reports."""
    return {key: row.get(key) for key in ("num_layers", "perplexity", "params", "params_m", "latency_ms",
                                          "latency_iqr_ms", "prefill_ms", "tokens_per_s")}


def reproduce_command(data: DataSpec, path: str, windows: WindowSpec, dtype: str, device: str) -> str:
    """The kit command that evaluates the saved checkpoint exactly as the run did."""
    cmd = ["python", "main.py", "--mode", "baseline", "--model", path, "--dataset", data.dataset,
           "--split", data.split, "--text-column", data.text_column, "--max-length", str(windows.max_length),
           "--stride", str(windows.stride), "--batch-size", str(windows.batch_size), "--dtype", dtype,
           "--device", device, "--no-speed"]
    if data.max_tokens:
        cmd += ["--max-tokens", str(data.max_tokens)]
    return shlex.join(cmd)


def build_report(config: RunConfig, rows: Sequence[dict], windows: WindowSpec, healing: dict | None,
                 checkpoint_ppl: float, dtype: str, device: str, model_type: str) -> dict:
    """Everything the model card states, as data; ``windows`` are the run's resolved windows."""
    original, pruned = rows[0], rows[-1]
    removal = row_removal(pruned)
    removed = list(removed_whole(removal))
    n = original["num_layers"]
    data, speed = config.data, config.speed
    return {
        "source_model": data.model,
        "model_type": model_type,
        "mode": config.mode,
        "removed_blocks": removed,
        "kept_blocks": list(kept_blocks(n, removed)),
        # every removed unit; attnN / mlpN are kept in the checkpoint with their output projection zeroed
        "removed_units": unit_names(removal),
        "zeroed_sublayers": [u for u in unit_names(removal) if not u.startswith("block")],
        "evaluation": {"dataset": data.dataset, "split": data.split, "text_column": data.text_column,
                       "scored_tokens": pruned["eval_tokens"], "max_length": windows.max_length,
                       "stride": windows.stride, "batch_size": windows.batch_size, "device": device,
                       "dtype": dtype, "speed_runs": speed.runs if speed.enabled else None,
                       "gen_tokens": speed.gen_tokens if speed.enabled else None},
        "original": measured(original),
        "pruned": measured(pruned),
        "healing": healing,
        "checkpoint_perplexity": checkpoint_ppl,
        "command": shlex.join(config.command_line or ["python", "main.py"]),
        "reproduce": reproduce_command(data, config.output.save_model or "DIR", windows, dtype, device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "created": datetime.now().isoformat(timespec="seconds"),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "not measured"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value: float | None, reference: float | None) -> str:
    pct = change_pct(value, reference)
    return "" if pct is None else f"{pct:+.2f}%"


def _zeroed_note(report: dict) -> list[str]:
    """What a card says about removed sublayers, which plain transformers cannot skip."""
    zeroed = report.get("zeroed_sublayers") or []
    if not zeroed:
        return []
    return ["## Removed sublayers (weights kept, zeroed)", "",
            f"Also removed: {', '.join(f'`{u}`' for u in zeroed)} (attnN: the attention of original block N, "
            "mlpN: its MLP). Plain transformers has no way to skip a sublayer, so this checkpoint keeps their "
            "weights with each one's output projection set to zero: the sublayer adds exactly nothing, the "
            "outputs are those of the pruned model, but the checkpoint has the full parameter count of its "
            "blocks and computes (and caches) these sublayers: no size or speed gain here. The pruned "
            "parameters and speed below are the kit's, which skips them.", ""]


def model_card(report: dict) -> str:
    """README.md for the checkpoint directory, from build_report's data."""
    o, p, h, ev = report["original"], report["pruned"], report["healing"], report["evaluation"]
    source = report["source_model"]
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                              tags=[report["model_type"], "depth-pruning"],
                              base_model=None if looks_local(source) else source)
    front = ["---", card_data.to_yaml(), "---"]

    metrics = [("Transformer blocks", o["num_layers"], p["num_layers"], 0),
               ("Parameters (M)", o["params_m"], p["params_m"], 2),
               ("Perplexity", o["perplexity"], p["perplexity"], 2),
               ("Generation latency (ms, median)", o["latency_ms"], p["latency_ms"], 2),
               ("Generated tokens/s", o["tokens_per_s"], p["tokens_per_s"], 1),
               ("Prefill latency (ms)", o["prefill_ms"], p["prefill_ms"], 2)]
    table = ["| Metric | Original | Pruned | Change |", "|---|---:|---:|---:|"]
    for label, a, b, digits in metrics:
        table.append(f"| {label} | {_fmt(a, digits)} | {_fmt(b, digits)} | {_pct(b, a)} |")

    name = os.path.basename(source.rstrip("/\\")) or source
    speed = (f"Latency is the median of {ev['speed_runs']} greedy generations of exactly {ev['gen_tokens']} tokens "
             f"with the KV cache, prefill one forward pass over {PREFILL_TOKENS} tokens (or the "
             f"context size if smaller), on {ev['device']} in {ev['dtype']}."
             if ev["speed_runs"] else "Speed was not measured (--no-speed).")
    lines = [*front, "", f"# {name}, depth-pruned to {p['num_layers']} of {o['num_layers']} blocks", "",
             f"Made with gpt2-pruning-kit (mode `{report['mode']}`) from `{source}` by removing transformer blocks "
             f"{', '.join(map(str, report['removed_blocks']))} (0-based) and keeping blocks "
             f"{', '.join(map(str, report['kept_blocks']))}, which are renumbered 0..{p['num_layers'] - 1} here.", "",
             "## Removed blocks", "", f"`{json.dumps(report['removed_blocks'])}`", "",
             *_zeroed_note(report), "## Before and after", "", *table, "", speed, ""]
    if h:
        lines += ["## Healing", "",
                  f"After pruning, the model was fine-tuned for {h['steps']} steps ({h['mode']}"
                  + (f", rank {h['lora_rank']}, merged into the weights" if h["mode"] == "lora" else "")
                  + f"; {h['loss']}; lr {h['lr']:g}; {h['batch_size']} x {h['seq_len']} tokens per step) on "
                  f"`{h['train_dataset']}`, which is not the evaluation text. Training loss went from "
                  f"{h['first_loss']:.4f} to {h['last_loss']:.4f}.", "",
                  "| Model | Perplexity | Change vs original |", "|---|---:|---:|",
                  f"| Original | {_fmt(o['perplexity'])} | |",
                  f"| Pruned | {_fmt(p['perplexity'])} | {_pct(p['perplexity'], o['perplexity'])} |",
                  f"| Pruned and healed (this checkpoint) | {_fmt(h['perplexity'])} | "
                  f"{_pct(h['perplexity'], o['perplexity'])} |", "",
                  "Healing does not change the architecture, so the pruned speed applies to this checkpoint.", ""]
    lines += ["## Evaluation", "",
              f"Sliding-window perplexity over {ev['scored_tokens']:,} scored tokens of `{ev['dataset']}`"
              f"{'' if is_local_dataset(ev['dataset']) else ' (split `' + ev['split'] + '`)'}, windows of {ev['max_length']} tokens every {ev['stride']} tokens, "
              f"{ev['device']}, {ev['dtype']}. Perplexity of this checkpoint: {report['checkpoint_perplexity']!r}.",
              "The kit measures it again from this directory with:", "", "```bash", report["reproduce"], "```", "",
              "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_DIRECTORY")',
              'model = AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_DIRECTORY")',
              'inputs = tokenizer("The future of artificial intelligence is", return_tensors="pt")',
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))", "```", "",
              f"It is a plain `{report['model_type']}` checkpoint: no custom code, no peft.", "",
              "## How it was made", "", "```bash", report["command"], "```", "",
              f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
              f"{report['created']}.", ""]
    return "\n".join(lines)
