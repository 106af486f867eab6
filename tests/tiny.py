"""Tiny GPT-2 models, a tokenizer and text that the tests build themselves,
so the suite never needs the network."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

SUBJECTS = ["the river", "a small town", "the old bridge", "the council", "her brother", "the museum",
            "a quiet farmer", "the northern road", "the army", "the new school", "his first album", "the storm"]
VERBS = ["crossed", "built", "described", "opened", "followed", "replaced", "recorded", "defended", "reached",
         "visited", "announced", "destroyed"]
OBJECTS = ["the valley", "a stone church", "the eastern coast", "several songs", "the main station",
           "a long winter", "the city walls", "three bridges", "the harbour", "an early plan", "the island"]
TAILS = ["in 1887", "after the war", "during the summer", "for many years", "with great care", "by the sea",
         "before the election", "under a new name"]


def make_text(n_sentences: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_sentences // 6):
        sentences = [f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                     f"{rng.choice(TAILS)}." for _ in range(6)]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def make_tokenizer(text: str, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_model(n_layer: int = 4, vocab_size: int = 320, n_embd: int = 32, n_head: int = 2, n_positions: int = 128,
               seed: int = 0, identity: tuple[int, ...] = ()) -> GPT2LMHeadModel:
    """Random GPT-2; blocks listed in ``identity`` add exactly zero to the residual stream."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    for index in identity:
        make_identity_block(model, index)
    return model


@torch.no_grad()
def make_identity_block(model: GPT2LMHeadModel, index: int) -> None:
    block = model.transformer.h[index]
    for proj in (block.attn.c_proj, block.mlp.c_proj):
        proj.weight.zero_()
        proj.bias.zero_()


def save_model_dir(path: Path, model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_briefly(model: GPT2LMHeadModel, ids: torch.Tensor, steps: int = 60, identity: tuple[int, ...] = (),
                  lr: float = 3e-3, seed: int = 0) -> GPT2LMHeadModel:
    """A few AdamW steps on random 64-token slices of ``ids``.

    A random model's blocks are noise, and removing noise can lower
    perplexity; after a little training removing a real block hurts. The
    output projections of the ``identity`` blocks are frozen at zero, so those
    blocks stay exact identities.
    """
    for index in identity:
        block = model.transformer.h[index]
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            proj.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 64, (16,), generator=gen)
        batch = torch.stack([ids[s : s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# A multiple-choice lm-eval task over the corpus's sentence openings, written as YAML over a local jsonl
# file, so that --tasks runs offline (tests/test_tasks.py, tests/test_distributed.py).
TASK = "tiny_mc"
N_EXAMPLES = 12

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def examples() -> list[dict]:
    """Sentence openings of the tiny corpus, each with three objects to choose from."""
    return [{"query": f"{SUBJECTS[i % len(SUBJECTS)].capitalize()} {VERBS[i % len(VERBS)]}",
             "choices": [OBJECTS[(i + j) % len(OBJECTS)] for j in range(3)], "label": i % 3}
            for i in range(N_EXAMPLES)]


def write_task(folder: Path) -> Path:
    """The task's jsonl and YAML in ``folder``, for --include-path."""
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples()), encoding="utf-8")
    (folder / "tiny_mc.yaml").write_text(YAML.format(name=TASK, data=data), encoding="utf-8")
    return folder
