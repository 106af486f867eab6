"""Handing the user the pruned model: optional healing, then a standard
Hugging Face checkpoint with a model card.

The checkpoint is what save_pretrained writes (config.json with the pruned
depth, model.safetensors, generation config) plus the tokenizer, so it loads
with AutoModelForCausalLM.from_pretrained and no custom code or peft. Next to
it go README.md, a model card a person reads, and pruning_report.json, the
same facts for a program (export.card). The perplexity the card states for the
checkpoint is measured on the model object that was saved, and the card gives
the kit command that measures it again from the directory.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import shutil
import tempfile
from typing import Sequence

from safetensors import SafetensorError

import torch
from torch import nn

from config import HealSpec, RunConfig
from evaluation.perplexity import perplexity
from evaluation.sweep import EvalSettings
from export.card import build_report, model_card
from export.gguf import export_gguf
from export.heal import HealResult, describe, heal
from models.compensation import Patch, applied
from models.loading import dtype_name
from models.gguf_source import source_of
from models.placement import input_device
from models.removal import removed_blocks, zeroed_copy
from models.units import is_whole_blocks, row_removal
from pruning.compensation import describe as describe_patch
from reporting.schema import change_pct
from utils.errors import KitError, WriteError, first_line
from utils.text import format_table

log = logging.getLogger("gpt2-pruning-kit")

REPORT_FILE = "pruning_report.json"
# Held (flock) by the run writing a staging folder; a folder whose lock nobody holds was left by a killed run.
STAGING_LOCK = ".kit-writing"
# Tokens of the evaluation text used to check that the written checkpoint reloads to the same model.
CHECK_TOKENS = 64
CHECK_GEN_TOKENS = 8


@torch.no_grad()
def verify_reload(path: str, model: nn.Module, sample_ids: torch.Tensor) -> bool:
    """Reload the checkpoint with plain transformers and compare it with ``model``.

    Logits on ``sample_ids`` and a short greedy generation with the KV cache
    must match; a mismatch is logged (the files are already written) and
    returns False.
    """
    from transformers import AutoModelForCausalLM

    device = input_device(model)
    inputs = sample_ids.view(1, -1).to(device)
    placement = getattr(model, "kit_placement", None)
    if placement is None:
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype, trust_remote_code=False).to(device)
        return _same_model(reloaded.eval(), model, inputs)
    # placed as the run's model was (it may not fit on one device), disk offload in a folder of its own
    with tempfile.TemporaryDirectory(prefix=".reload-offload-", dir=os.path.dirname(os.path.abspath(path))) as spill:
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype, trust_remote_code=False,
                                                        **placement.load_kwargs(offload_dir=spill))
        return _same_model(reloaded.eval(), model, inputs)


def _same_model(reloaded: nn.Module, model: nn.Module, inputs: torch.Tensor) -> bool:
    diff = (reloaded(input_ids=inputs).logits.to(inputs.device) - model(input_ids=inputs).logits).abs().max().item()
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    gen = dict(max_new_tokens=CHECK_GEN_TOKENS, do_sample=False, use_cache=True, pad_token_id=pad,
               attention_mask=torch.ones_like(inputs))
    same_text = torch.equal(reloaded.generate(inputs, **gen), model.generate(inputs, **gen))
    if diff == 0.0 and same_text:
        log.info("Checked: the checkpoint reloads with AutoModelForCausalLM to identical logits and generation")
        return True
    log.warning(f"The checkpoint reloads to a different model: max logit difference {diff:.3g}, "
                f"generation {'identical' if same_text else 'differs'}")
    return False


def export_model(model: nn.Module, tokenizer, path: str, report: dict, sample_ids: torch.Tensor) -> None:
    """Write checkpoint, tokenizer, model card and report to ``path``, all or nothing.

    Everything is written into a temporary directory beside ``path``, reloaded
    and checked there, and only then renamed to ``path``: a full disk, a
    read-only folder or a checkpoint that reloads differently leaves ``path``
    as it was (absent or empty) and no partial directory behind.
    """
    parent = os.path.dirname(os.path.abspath(path))
    staging = tempfile.mkdtemp(prefix=staging_prefix(path), dir=parent)
    lock = os.open(os.path.join(staging, STAGING_LOCK), os.O_WRONLY | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(report))
        with open(os.path.join(staging, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        if not verify_reload(staging, model, sample_ids):
            raise WriteError(f"the checkpoint written for '{path}' reloads to a different model; nothing was saved")
        os.remove(os.path.join(staging, STAGING_LOCK))
        if os.path.isdir(path):
            os.rmdir(path)  # checked empty before the run
        os.rename(staging, path)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise WriteError(f"cannot write the pruned model to '{path}': {reason}; nothing was saved there (the "
                         "results files are intact)") from None
    finally:
        os.close(lock)
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    log.warning(f"Pruned model written to {path}")
    log.info(f"Model card: {os.path.join(path, 'README.md')}")


def staging_prefix(path: str) -> str:
    return f".{os.path.basename(os.path.abspath(path))}.partial-"


def check_save_target(path: str) -> None:
    """Before any work: a --save-model path that is a link is refused (the final rename would replace the link,
    not fill the folder it names), and staging folders that killed runs left beside it are removed (their lock
    is free) or named (one without a lock, from an older kit)."""
    if os.path.islink(path):
        dangling = "" if os.path.exists(path) else ", which does not exist"
        raise KitError(f"--save-model '{path}' is a symbolic link (to '{os.readlink(path)}'{dangling}); give the "
                       "folder's own path")
    parent = os.path.dirname(os.path.abspath(path))
    for staging in sorted(glob.glob(os.path.join(glob.escape(parent), glob.escape(staging_prefix(path)) + "*"))):
        if not os.path.isdir(staging) or os.path.islink(staging):
            continue
        if stale(staging):
            shutil.rmtree(staging, ignore_errors=True)
            log.warning(f"Removed '{staging}', a partial --save-model folder left by a run that was killed")
        elif not os.path.exists(os.path.join(staging, STAGING_LOCK)):
            log.warning(f"'{staging}' is a partial --save-model folder of an interrupted run (or of one still "
                        f"writing): remove it once no run is saving to '{path}'")


def stale(staging: str) -> bool:
    """Whether no process holds the staging folder's lock (its writer is gone)."""
    try:
        fd = os.open(os.path.join(staging, STAGING_LOCK), os.O_WRONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def healing_table(rows: Sequence[dict], healed_ppl: float) -> str:
    original, pruned = rows[0], rows[-1]
    body = [[name, str(pruned["num_layers"] if name != "Original" else original["num_layers"]), f"{ppl:,.2f}",
             "" if name == "Original" else f"{change_pct(ppl, original['perplexity']):+,.2f}"]
            for name, ppl in (("Original", original["perplexity"]), ("Pruned", pruned["perplexity"]),
                              ("Pruned + healed", healed_ppl))]
    return format_table(["Model", "Layers", "Perplexity", "PPL Chg (%)"], body)


def deliver(config: RunConfig, model: nn.Module, tokenizer, rows: Sequence[dict], ids: torch.Tensor,
            settings: EvalSettings, heal_spec: HealSpec | None, train_ids: torch.Tensor | None,
            patch: Patch | None = None, calibration: str | None = None) -> None:
    """Heal the run's final configuration if asked, then export it if asked.

    rows[0] is the unpruned baseline and rows[-1] the configuration the mode
    chose. The pruned perplexity before healing is that row's: the student
    starts as an exact copy of the model it measured. ``heal_spec`` is the
    resolved HealSpec (None: no healing). ``patch``: the maps --patch fitted
    for rows[-1] (on the ``calibration`` text, in words), merged into the
    exported weights and the student's starting point.
    """
    removed = row_removal(rows[-1])
    device, dtype = input_device(model).type, dtype_name(model)
    w, target = settings.windows, config.output.save_model
    healing, healed = None, None
    if heal_spec is not None:
        result: HealResult = heal(model, removed, train_ids, heal_spec, progress=settings.progress, patch=patch)
        healed = result.model
        healed_ppl = perplexity(healed, ids, w.max_length, w.stride, w.batch_size, progress=settings.progress,
                                desc="healed windows", protocol=w.protocol, prefix_token=w.prefix_token).perplexity
        healing = {**describe(heal_spec),
                   "train_dataset": heal_spec.train_dataset or f"{config.data.dataset} (train split)",
                   "first_loss": result.losses[0], "last_loss": result.losses[-1], "perplexity": healed_ppl,
                   "tasks": settings.tasks(healed) if settings.tasks else None}
        if not config.output.quiet:
            print(f"\nHealing ({heal_spec.mode}, {heal_spec.steps} steps, training loss "
                  f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}; perplexity on the evaluation text)\n")
            print(healing_table(rows, healed_ppl))
    if config.output.save_gguf:
        export_gguf(model, removed, config.output.save_gguf, ids[:CHECK_TOKENS], patch)
    if not target:
        return
    checkpoint_ppl = healing["perplexity"] if healed is not None else rows[-1]["perplexity"]
    report = build_report(config, rows, w, healing, checkpoint_ppl, dtype, device, model.config.model_type,
                          source_of(model), compensation(patch, calibration) if patch else None)
    if healed is not None:
        export_model(healed, tokenizer, target, report, ids[:CHECK_TOKENS])
        return
    if not is_whole_blocks(removed):  # partial blocks: plain transformers cannot skip a sublayer
        export_model(zeroed_copy(model, removed), tokenizer, target, report, ids[:CHECK_TOKENS])
        return
    with removed_blocks(model, removed) as pruned, applied(pruned, patch):
        export_model(pruned, tokenizer, target, report, ids[:CHECK_TOKENS])


def compensation(patch: Patch, calibration: str | None) -> dict:
    """The model card's record of the fitted maps: method, paper, calibration text, where each went."""
    return {**describe_patch(patch), "calibration": calibration}
