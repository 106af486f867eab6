"""The model card of an exported checkpoint: the facts as data (build_report,
written as pruning_report.json) and as the README.md a person reads."""

from __future__ import annotations

import json
import math
import os
import shlex
from datetime import datetime
from typing import Any, Sequence

import torch
import transformers
from huggingface_hub import ModelCardData

from config import DataSpec, RunConfig, WindowSpec
from evaluation.latency import PREFILL_TOKENS
from evaluation.windows import DEFAULT_PROTOCOL, PROTOCOLS
from models.gguf_source import GgufSource
from models.loading import looks_local
from models.units import kept_blocks, removed_whole, row_removal, unit_names
from reporting.schema import change_pct, row_task_scores, speed_within_noise
from utils.data import is_local_dataset
from utils.metadata import library_versions


def measured(row: dict) -> dict:
    """The numbers of one result row that the model card reports."""
    return {key: row.get(key) for key in ("num_layers", "perplexity", "params", "params_m", "latency_ms",
                                          "latency_iqr_ms", "prefill_ms", "tokens_per_s", "speed_change_pct",
                                          "speed_change_low_pct", "speed_change_high_pct", "baseline_latency_ms")}


def reproduce_command(data: DataSpec, path: str, windows: WindowSpec, dtype: str, device: str) -> str:
    """The kit command that evaluates the saved checkpoint exactly as the run did."""
    cmd = ["python", "main.py", "--mode", "baseline", "--model", path, "--dataset", data.dataset,
           "--split", data.split, "--text-column", data.text_column, "--max-length", str(windows.max_length),
           *(["--stride", str(windows.stride)] if windows.stride else []), "--protocol", windows.protocol,
           *(["--bos"] if windows.bos else []), "--batch-size", str(windows.batch_size), "--dtype", dtype,
           "--device", device, "--no-speed"]
    if data.max_tokens:
        cmd += ["--max-tokens", str(data.max_tokens)]
    return shlex.join(cmd)


def build_report(config: RunConfig, rows: Sequence[dict], windows: WindowSpec, healing: dict | None,
                 checkpoint_ppl: float, dtype: str, device: str, model_type: str,
                 gguf: GgufSource | None = None, compensation: dict | None = None) -> dict:
    """Everything the model card states, as data; ``windows`` are the run's resolved windows, ``gguf`` the
    GGUF file the model was loaded from (None: an ordinary checkpoint), ``compensation`` the maps --patch
    fitted and merged (export.checkpoint.compensation), or None."""
    original, pruned = rows[0], rows[-1]
    # lm-eval scores of the original and pruned model ({} without --tasks); the healed one's are in healing["tasks"]
    tasks = {"original": row_task_scores(original), "pruned": row_task_scores(pruned)}
    tasks = tasks if tasks["original"] else {}
    removal = row_removal(pruned)
    removed = list(removed_whole(removal))
    n = original["num_layers"]
    data, speed = config.data, config.speed
    return {
        "source_model": data.model,
        "source_gguf": {**gguf.as_dict(), "dequantized_to": dtype, "note": gguf.describe(dtype)} if gguf else None,
        "model_type": model_type,
        "mode": config.mode,
        "removed_blocks": removed,
        "kept_blocks": list(kept_blocks(n, removed)),
        # every removed unit; attnN / mlpN are kept in the checkpoint with their output projection zeroed
        "removed_units": unit_names(removal),
        "zeroed_sublayers": [u for u in unit_names(removal) if not u.startswith("block")],
        "evaluation": {"dataset": data.dataset, "split": data.split, "text_column": data.text_column,
                       "scored_tokens": pruned["eval_tokens"], "max_length": windows.max_length,
                       "stride": windows.stride, "protocol": windows.protocol, "bos": windows.bos,
                       "prefix_token": windows.prefix_token, "batch_size": windows.batch_size, "device": device,
                       "dtype": dtype, "speed_runs": speed.runs if speed.enabled else None,
                       "gen_tokens": speed.gen_tokens if speed.enabled else None},
        "original": measured(original),
        "pruned": measured(pruned),
        "healing": healing,
        "compensation": compensation,
        "tasks": tasks,
        "checkpoint_perplexity": checkpoint_ppl,
        "command": shlex.join(config.command_line or ["python", "main.py"]),
        "reproduce": reproduce_command(data, config.output.save_model or "DIR", windows, dtype, device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     **({"lm_eval": library_versions()["lm_eval"]} if tasks else {})},
        "created": datetime.now().isoformat(timespec="seconds"),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "not measured"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value: float | None, reference: float | None) -> str:
    pct = change_pct(value, reference)
    return "" if pct is None else f"{pct:+.2f}%"


def task_lines(report: dict) -> list[str]:
    """The card's downstream-task table: original, pruned and (after healing) healed scores in percent."""
    tasks = report.get("tasks") or {}
    if not tasks:
        return []
    healed = (report["healing"] or {}).get("tasks")
    models = [("Original", tasks["original"]), ("Pruned", tasks["pruned"])] + ([("Healed", healed)] if healed else [])
    percent = lambda scores, t, m: _fmt(None if scores[t].get(m) is None else scores[t][m] * 100)
    table = ["| Task | Metric | Examples | " + " | ".join(name for name, _ in models) + " |",
             "|---|---|---:|" + "---:|" * len(models)]
    for task, values in tasks["original"].items():
        for metric in (m for m in values if m not in ("n",) and not m.endswith("_stderr")):
            cells = [f"{percent(scores, task, metric)} ± {percent(scores, task, metric + '_stderr')}"
                     for _, scores in models]
            table.append(f"| {task} | {metric} | {values.get('n')} | " + " | ".join(cells) + " |")
    return ["## Downstream tasks", "", f"lm-evaluation-harness {report['versions'].get('lm_eval')} scores in percent "
            "± standard error, each model scored in memory on the same examples.", "", *table, ""]


def _speed_changes(pruned: dict) -> dict[str, str] | None:
    """Change cells of the generation rows, from the latency change against the interleaved baseline runs.

    Tokens per second is the inverse of latency, so its change and interval
    follow from the same runs. None: no interval (speed not measured).
    """
    within = speed_within_noise(pruned)
    if within is None:
        return None
    change, low, high = (pruned[k] for k in ("speed_change_pct", "speed_change_low_pct", "speed_change_high_pct"))
    inverse = lambda pct: (1.0 / (1.0 + pct / 100.0) - 1.0) * 100.0
    note = "within the timing noise:" if within else "95% interval"
    bounded = math.isfinite(low) and math.isfinite(high)
    cell = lambda c, a, b: (f"{c:+.2f}% ({note} {min(a, b):+.2f}% to {max(a, b):+.2f}%)" if bounded
                            else f"{c:+.2f}% ({note} too few runs for an interval)")
    return {"latency_ms": cell(change, low, high),
            "tokens_per_s": cell(inverse(change), inverse(low), inverse(high)),
            "prefill_ms": ""}


def _windows(ev: dict) -> str:
    """The evaluation's windows in words: its protocol and whether BOS started every window."""
    text = PROTOCOLS[ev.get("protocol", DEFAULT_PROTOCOL)].sentence.format(**ev)
    return text + (f", each fed the BOS token (id {ev['prefix_token']}) first" if ev.get("bos") else "")


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
            "parameters and speed below are the kit's, which skips them."
            + (" Healing kept these projections frozen at zero." if report.get("healing") else ""), ""]


def _gguf_note(report: dict) -> list[str]:
    """What a card says about a GGUF source: how it stored its weights, and that this checkpoint holds them
    dequantized."""
    gguf = report.get("source_gguf")
    if not gguf:
        return []
    kind = f", file type {gguf['file_type']}" if gguf.get("file_type") else ""
    stored = (f"stores quantized weights ({', '.join(gguf['quantized_types'])}{kind})" if gguf["quantized_types"]
              else f"stores {', '.join(gguf['tensor_types'])} weights{kind}")
    return ["## Source: a GGUF file", "",
            f"`{gguf['file']}` {stored}. transformers' GGUF support loaded it with every tensor dequantized to "
            f"{gguf['dequantized_to']}, and this checkpoint stores those values: the perplexities below are of the "
            "dequantized weights and carry the quantization's error.", ""]


def _compensation_note(report: dict) -> list[str]:
    """What a card says about --patch's maps: which were fitted, on what text, by which method, merged where."""
    c = report.get("compensation")
    if not c:
        return []
    rows = [f"| {', '.join(map(str, m['removed_blocks']))} | {m['merged_into']} | {m['tokens']:,} | "
            f"{m['seconds']:.2f} |" for m in c["maps"]]
    lines = ["## Compensation (training-free)", "",
             f"Each removed run of blocks {c['merged']} (`--patch {c['method']}`: {c['paper']}); "
             "no module was added, the architecture is the family's own. The pruned numbers below are this "
             "patched model's.", "", f"Calibration text: {c.get('calibration') or 'not recorded'}", "",
             "| Removed blocks | Merged into | Calibration tokens | Fit (s) |", "|---|---|---:|---:|", *rows, ""]
    if c.get("untied_embeddings"):
        lines += ["The run starting at block 0 has no block before it, so its map went into the token embeddings, "
                  "which the original model shares with its LM head: this checkpoint unties them "
                  "(`tie_word_embeddings: false`), the LM head keeping the original matrix, which adds a vocabulary "
                  "x width matrix of parameters.", ""]
    return lines


def _what_was_removed(report: dict, name: str) -> list[str]:
    """The card's title and first paragraph: the blocks removed, or only sublayers (all blocks kept)."""
    o, p, blocks = report["original"], report["pruned"], report["removed_blocks"]
    made = f"Made with gpt2-pruning-kit (mode `{report['mode']}`) from `{report['source_model']}`"
    if not blocks:  # only attention or MLP sublayers: the depth is unchanged
        units = report["zeroed_sublayers"]
        return [f"# {name}, with {len(units)} sublayer{'s' if len(units) > 1 else ''} removed", "",
                f"{made} by removing {', '.join(units)} (0-based block indices); all {o['num_layers']} blocks "
                "are kept.", "", "## Removed units", "", f"`{json.dumps(report['removed_units'])}`", ""]
    return [f"# {name}, depth-pruned to {p['num_layers']} of {o['num_layers']} blocks", "",
            f"{made} by removing transformer blocks {', '.join(map(str, blocks))} (0-based) and keeping blocks "
            f"{', '.join(map(str, report['kept_blocks']))}, which are renumbered 0..{p['num_layers'] - 1} here.", "",
            "## Removed blocks", "", f"`{json.dumps(blocks)}`", ""]


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
    paired = _speed_changes(p)
    table = ["| Metric | Original | Pruned | Change |", "|---|---:|---:|---:|"]
    for (label, a, b, digits), key in zip(metrics, ("num_layers", "params_m", "perplexity", "latency_ms",
                                                    "tokens_per_s", "prefill_ms")):
        change = paired[key] if paired and key in paired else _pct(b, a)
        table.append(f"| {label} | {_fmt(a, digits)} | {_fmt(b, digits)} | {change} |")

    name = os.path.basename(source.rstrip("/\\")) or source
    speed = (f"Latency is the median of {ev['speed_runs']} greedy generations of exactly {ev['gen_tokens']} tokens "
             f"with the KV cache, prefill one forward pass over {PREFILL_TOKENS} tokens (or the "
             f"context size if smaller), on {ev['device']} in {ev['dtype']}."
             if ev["speed_runs"] else "Speed was not measured (--no-speed).")
    if paired:
        speed += (f" The pruned model's runs alternated with {ev['speed_runs']} runs of the original (median "
                  f"{_fmt(p['baseline_latency_ms'])} ms), and the speed changes are against those, with a 95% "
                  "bootstrap interval over the run pairs; a change whose interval includes 0 is within the timing "
                  "noise: the runs cannot tell the two models apart. The original's own latency above comes from "
                  "runs of its own, at another moment. No interval was measured for prefill, so its change is "
                  "left out.")
    lines = [*front, "", *_what_was_removed(report, name), *_gguf_note(report),
             *_zeroed_note(report), *_compensation_note(report), "## Before and after", "", *table, "", speed, ""]
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
    lines += task_lines(report)
    lines += ["## Evaluation", "",
              f"Perplexity over {ev['scored_tokens']:,} scored tokens of `{ev['dataset']}`"
              f"{'' if is_local_dataset(ev['dataset']) else ' (split `' + ev['split'] + '`)'}, {_windows(ev)}, "
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
