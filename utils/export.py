"""Handing the user the pruned model: optional healing, then a standard
Hugging Face checkpoint with a model card.

The checkpoint is what save_pretrained writes (config.json with the pruned
depth, model.safetensors, generation config) plus the tokenizer, so it loads
with AutoModelForCausalLM.from_pretrained and no custom code or peft. Next to
it go README.md, a model card a person reads, and pruning_report.json, the
same facts for a program. The perplexity the card states for the checkpoint is
measured on the model object that was saved, and the card gives the kit
command that measures it again from the directory.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from argparse import Namespace
from datetime import datetime
from typing import Any, Sequence

import torch
import transformers
from torch import nn

from evaluation.latency import PREFILL_TOKENS
from evaluation.perplexity import perplexity
from evaluation.sweep import EvalSettings
from pruning.blocks import kept_blocks, removed_blocks
from pruning.heal import HealResult, HealSettings, heal
from utils.data import is_local_dataset
from utils.models import dtype_name, looks_local
from utils.results import change_pct, format_table

log = logging.getLogger("gpt2-pruning-kit")

REPORT_FILE = "pruning_report.json"
# Tokens of the evaluation text used to check that the written checkpoint reloads to the same model.
CHECK_TOKENS = 64
CHECK_GEN_TOKENS = 8


def measured(row: dict) -> dict:
    """The numbers of one result row that the model card reports."""
    return {key: row.get(key) for key in ("num_layers", "perplexity", "params", "params_m", "latency_ms",
                                          "latency_iqr_ms", "prefill_ms", "tokens_per_s")}


def reproduce_command(args: Namespace, path: str, settings: EvalSettings, dtype: str, device: str) -> str:
    """The kit command that evaluates the saved checkpoint exactly as the run did."""
    cmd = ["python", "main.py", "--mode", "baseline", "--model", path, "--dataset", args.dataset,
           "--split", args.split, "--text-column", args.text_column, "--max-length", str(settings.max_length),
           "--stride", str(settings.stride), "--batch-size", str(settings.batch_size), "--dtype", dtype,
           "--device", device, "--no-speed"]
    if args.max_tokens:
        cmd += ["--max-tokens", str(args.max_tokens)]
    return shlex.join(cmd)


def build_report(args: Namespace, rows: Sequence[dict], settings: EvalSettings, path: str | None,
                 healing: dict | None, checkpoint_ppl: float, dtype: str, device: str, model_type: str) -> dict:
    """Everything the model card states, as data."""
    original, pruned = rows[0], rows[-1]
    removed = list(pruned["removed_layers"])
    n = original["num_layers"]
    return {
        "source_model": args.model,
        "model_type": model_type,
        "mode": args.mode,
        "removed_blocks": removed,
        "kept_blocks": list(kept_blocks(n, removed)),
        "evaluation": {"dataset": args.dataset, "split": args.split, "text_column": args.text_column,
                       "scored_tokens": pruned["eval_tokens"], "max_length": settings.max_length,
                       "stride": settings.stride, "batch_size": settings.batch_size, "device": device,
                       "dtype": dtype, "speed_runs": settings.speed_runs if settings.speed else None,
                       "gen_tokens": settings.gen_tokens if settings.speed else None},
        "original": measured(original),
        "pruned": measured(pruned),
        "healing": healing,
        "checkpoint_perplexity": checkpoint_ppl,
        "command": shlex.join(getattr(args, "command_line", None) or ["python", "main.py"]),
        "reproduce": reproduce_command(args, path or "DIR", settings, dtype, device),
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


def model_card(report: dict) -> str:
    """README.md for the checkpoint directory, from build_report's data."""
    o, p, h, ev = report["original"], report["pruned"], report["healing"], report["evaluation"]
    source = report["source_model"]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:",
             f"- {report['model_type']}", "- depth-pruning"]
    if not looks_local(source):
        front.insert(1, f"base_model: {source}")
    front.append("---")

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
             "## Before and after", "", *table, "", speed, ""]
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


@torch.no_grad()
def verify_reload(path: str, model: nn.Module, sample_ids: torch.Tensor) -> bool:
    """Reload the checkpoint with plain transformers and compare it with ``model``.

    Logits on ``sample_ids`` and a short greedy generation with the KV cache
    must match; a mismatch is logged (the files are already written) and
    returns False.
    """
    from transformers import AutoModelForCausalLM

    device = next(model.parameters()).device
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype).to(device).eval()
    inputs = sample_ids.view(1, -1).to(device)
    diff = (reloaded(input_ids=inputs).logits - model(input_ids=inputs).logits).abs().max().item()
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    gen = dict(max_new_tokens=CHECK_GEN_TOKENS, do_sample=False, use_cache=True, pad_token_id=pad,
               attention_mask=torch.ones_like(inputs))
    same_text = torch.equal(reloaded.generate(inputs, **gen), model.generate(inputs, **gen))
    if diff == 0.0 and same_text:
        log.info(f"Checked: {path} reloads with AutoModelForCausalLM to identical logits and generation")
        return True
    log.warning(f"{path} reloads to a different model: max logit difference {diff:.3g}, "
                f"generation {'identical' if same_text else 'differs'}")
    return False


def export_model(model: nn.Module, tokenizer, path: str, report: dict, sample_ids: torch.Tensor) -> None:
    """Write checkpoint, tokenizer, model card and report to ``path``."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(report))
    with open(os.path.join(path, REPORT_FILE), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    verify_reload(path, model, sample_ids)
    log.warning(f"Pruned model written to {path}")
    log.info(f"Model card: {os.path.join(path, 'README.md')}")


def healing_table(rows: Sequence[dict], healed_ppl: float) -> str:
    original, pruned = rows[0], rows[-1]
    body = [[name, str(pruned["num_layers"] if name != "Original" else original["num_layers"]), f"{ppl:,.2f}",
             "" if name == "Original" else f"{change_pct(ppl, original['perplexity']):+,.2f}"]
            for name, ppl in (("Original", original["perplexity"]), ("Pruned", pruned["perplexity"]),
                              ("Pruned + healed", healed_ppl))]
    return format_table(["Model", "Layers", "Perplexity", "PPL Chg (%)"], body)


def deliver(args: Namespace, model: nn.Module, tokenizer, rows: Sequence[dict], ids: torch.Tensor,
            settings: EvalSettings, heal_settings: HealSettings | None, train_ids: torch.Tensor | None) -> None:
    """Heal the run's final configuration if asked, then export it if asked.

    rows[0] is the unpruned baseline and rows[-1] the configuration the mode
    chose. The pruned perplexity before healing is that row's: the student
    starts as an exact copy of the model it measured.
    """
    removed = list(rows[-1]["removed_layers"])
    device, dtype = next(model.parameters()).device.type, dtype_name(model)
    sample_ids = ids[:CHECK_TOKENS]
    healing, healed = None, None
    if heal_settings is not None:
        result: HealResult = heal(model, removed, train_ids, heal_settings, progress=settings.progress)
        healed = result.model
        healed_ppl = perplexity(healed, ids, settings.max_length, settings.stride, settings.batch_size,
                                progress=settings.progress, desc="healed windows").perplexity
        healing = {**heal_settings.describe(), "train_dataset": args.train_dataset or f"{args.dataset} (train split)",
                   "first_loss": result.losses[0], "last_loss": result.losses[-1], "perplexity": healed_ppl}
        if not args.quiet:
            print(f"\nHealing ({heal_settings.mode}, {heal_settings.steps} steps, training loss "
                  f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}; perplexity on the evaluation text)\n")
            print(healing_table(rows, healed_ppl))
    if not args.save_model:
        return
    checkpoint_ppl = healing["perplexity"] if healed is not None else rows[-1]["perplexity"]
    report = build_report(args, rows, settings, args.save_model, healing, checkpoint_ppl, dtype, device,
                          model.config.model_type)
    if healed is not None:
        export_model(healed, tokenizer, args.save_model, report, sample_ids)
        return
    with removed_blocks(model, removed) as pruned:
        export_model(pruned, tokenizer, args.save_model, report, sample_ids)
