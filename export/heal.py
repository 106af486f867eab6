"""Healing a pruned model with a short fine-tune.

Gromov et al. (2024, "The Unreasonable Ineffectiveness of the Deeper Layers")
recover much of the quality lost to block removal with a brief parameter-
efficient fine-tune; this module does that for the kit's pruned models.

Design, and why:

- The pruned model of the sweep shares its tensors with the original
  (models.removal.removed_blocks prunes in place), so training it would change
  the original model too, and with it the teacher and any later measurement.
  The student is therefore a deep copy of the pruned model, taken once when
  healing starts; the original model is never written to and is the teacher.
  Removed attention or MLP sublayers are in the copy as the export writes
  them, output projections zeroed, and those projections are frozen.
- LoRA (Hu et al. 2021, via peft) is the default: adapters on every linear
  layer but the LM head (for GPT-2 the attention and MLP projections c_attn,
  c_proj, c_fc; for Llama-like models q/k/v/o and the MLP), alpha = 2 x rank,
  the base weights frozen. The adapters are merged into the weights afterwards
  (merge_and_unload), so the healed model is a plain GPT-2 that needs no peft.
  --heal-mode full trains every weight of the copy instead.
- With distillation (Hinton et al. 2015; used for depth-pruned LLMs by
  Kim et al. 2024, "Shortened LLaMA") the loss is KL(teacher || student) of
  the next-token distributions at every position, the teacher being the
  unpruned model, frozen and in eval mode. Without it, the loss is the usual
  next-token cross-entropy.
- Training windows are --heal-seq-len tokens at random offsets of the training
  token stream (drawn with --seed), never from the evaluation text, so the
  perplexity reported after healing is measured on tokens the student never saw.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from utils.log import progress_bar

from config import HealSpec
from models.compensation import Patch, applied
from models.families import family_of, num_blocks
from models.removal import check_units, context_size, zeroed_copy, zeroed_projections
from utils.cache import cached_token_ids
from utils.data import is_local_dataset
from utils.errors import KitError

log = logging.getLogger("gpt2-pruning-kit")

HEAL_MODES = ("lora", "full")
# peft's name for every linear (and Conv1D) layer except the LM head.
LORA_TARGETS = "all-linear"
MAX_GRAD_NORM = 1.0


def describe(spec: HealSpec) -> dict:
    """The settings as they went into training, for the model card."""
    out = {"mode": spec.mode, "steps": spec.steps, "lr": spec.learning_rate, "batch_size": spec.batch_size,
           "seq_len": spec.seq_len, "loss": "KL to the unpruned model (distillation)" if spec.kd
           else "next-token cross-entropy", "seed": spec.seed}
    if spec.mode == "lora":
        out.update(lora_rank=spec.lora_rank, lora_alpha=2 * spec.lora_rank, lora_targets=LORA_TARGETS)
    return out


@dataclass
class HealResult:
    model: nn.Module  # standalone healed pruned model (eval mode, no peft)
    losses: list[float]  # training loss of every step


def training_ids(tokenizer, train_dataset: str | None, dataset: str, text_column: str = "text",
                 cache_dir: str | None = None) -> torch.Tensor:
    """The healing text's token ids: --train-dataset, or else the train split of --dataset.

    A train split is large (WikiText-2's holds about 2.4M tokens), so its ids
    go through the token cache like the evaluation's.

    A local --dataset file has no train split, and training on the evaluation
    file would make the healed perplexity meaningless, so it needs an explicit
    --train-dataset.
    """
    if train_dataset is None:
        if is_local_dataset(dataset):
            raise KitError(f"healing needs training text: --dataset '{dataset}' is a local file with no train split; "
                           "pass --train-dataset (a Hub dataset or a local .txt/.json/.jsonl/.csv/.parquet file)")
    return cached_token_ids(tokenizer, train_dataset or dataset, "train", text_column, cache_dir)


def check_disjoint(train_ids: torch.Tensor, eval_ids: torch.Tensor) -> None:
    """Catch the one overlap a user can cause by hand: the evaluation file passed as training text.

    (Hub datasets' train and test splits are disjoint by construction.) The
    evaluation ids may be the first --max-tokens of the text, hence the prefix test.
    """
    if torch.equal(train_ids[: len(eval_ids)], eval_ids):
        raise KitError("the training text is the evaluation text; healing on it would make the reported perplexity "
                       "meaningless: pass a different --train-dataset")


def check_trainable(model: nn.Module, train_ids: torch.Tensor, settings: HealSpec) -> None:
    if next(model.parameters()).dtype == torch.float16:
        raise KitError("healing needs float32 or bfloat16 weights (float16 training without loss scaling diverges); "
                       "pass --dtype float32 or --dtype bfloat16")
    if len(train_ids) < settings.seq_len + 1:
        raise KitError(f"the training text has {len(train_ids)} tokens, fewer than --heal-seq-len "
                       f"{settings.seq_len} + 1; pass more text or a smaller --heal-seq-len")


def healing_inputs(spec: HealSpec, dataset: str, text_column: str, model: nn.Module, tokenizer,
                   eval_ids: torch.Tensor, context_size: int,
                   cache_dir: str | None = None) -> tuple[HealSpec | None, torch.Tensor | None]:
    """The resolved spec and training ids for --heal-steps, checked before any measurement starts
    (None, None without it)."""
    if not spec.steps:
        return None, None
    settings = spec.resolved(context_size)
    train_ids = training_ids(tokenizer, spec.train_dataset, dataset, text_column, cache_dir)
    check_disjoint(train_ids, eval_ids)
    check_trainable(model, train_ids, settings)
    return settings, train_ids


def random_windows(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A (batch_size, seq_len) batch of windows at random offsets of ``ids``."""
    starts = torch.randint(0, len(ids) - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def student_copy(model: nn.Module, removed: Sequence) -> tuple[nn.Module, list[nn.Module]]:
    """An independent copy of the pruned model, and the modules of it that must not train.

    Training the copy leaves ``model`` untouched. Removed sublayers (attnN,
    mlpN) are in the copy as in the exported checkpoint: kept, with their
    output projections zeroed (models.removal.zeroed_copy), so the student
    computes exactly the pruned model. Those projections are returned to be
    frozen: a zero weight still gets a gradient, and one step would bring the
    removed sublayer back.
    """
    student = zeroed_copy(model, removed)
    return student, zeroed_projections(student, check_units(model, removed), num_blocks(model))


def frozen(student: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Stop ``modules`` (and LoRA adapters peft put on them, which wrap them as ``base_layer``) from training."""
    wrapped = {id(m) for m in modules}
    for module in student.modules():
        if id(module) in wrapped or id(getattr(module, "base_layer", None)) in wrapped:
            module.requires_grad_(False)


def with_lora(model: nn.Module, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0,
                        fan_in_fan_out=family_of(model).transposed_linears, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over token positions of KL(teacher || student), in float32."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, 1)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def heal(model: nn.Module, removed: Sequence, train_ids: torch.Tensor, settings: HealSpec,
         progress: bool = True, patch: Patch | None = None) -> HealResult:
    """Fine-tune a copy of ``model`` with the units ``removed`` (blocks, attnN, mlpN) on ``train_ids`` (1-D).

    ``model`` is the unpruned model; it is only read (as the teacher with
    distillation) and is unchanged afterwards. With ``patch`` (--patch's maps
    for ``removed``) the student starts from the patched model; the teacher
    stays the unpatched original.
    """
    if settings.seq_len is None:
        settings = settings.resolved(context_size(model))
    if settings.mode not in HEAL_MODES:
        raise KitError(f"unknown heal mode '{settings.mode}' (choices: {', '.join(HEAL_MODES)})")
    check_trainable(model, train_ids, settings)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    device = next(model.parameters()).device

    with applied(model, patch):
        student, keep_zero = student_copy(model, removed)
    dtype = next(student.parameters()).dtype
    if settings.mode == "lora":
        student = with_lora(student, settings.lora_rank)  # peft keeps the adapters in float32
    else:
        # AdamW on bfloat16 weights rounds most small updates away (40% of the weights changed in 10
        # steps against 97% in float32): train float32 master weights and cast back once at the end.
        student.float().requires_grad_(True)
    frozen(student, keep_zero)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    log.info(f"Healing ({settings.mode}{', distillation' if settings.kd else ''}): {settings.steps} steps of "
             f"{settings.batch_size} x {settings.seq_len} tokens, lr {settings.learning_rate:g}, "
             f"{sum(p.numel() for p in trainable):,} trainable parameters")

    student.train()
    losses = []
    bar = progress_bar(range(settings.steps), desc="healing", unit="step", disable=not progress)
    for _ in bar:
        batch = random_windows(train_ids, settings.seq_len, settings.batch_size, generator).to(device)
        if settings.kd:
            with torch.no_grad():
                teacher_logits = model(input_ids=batch, use_cache=False).logits
            loss = kd_loss(student(input_ids=batch, use_cache=False).logits, teacher_logits)
        else:
            loss = student(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()

    if settings.mode == "lora":
        student = student.merge_and_unload()
    student.requires_grad_(False).to(dtype)
    return HealResult(student.eval(), losses)
