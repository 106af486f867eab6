"""Healing a pruned model: it learns, it stays a plain GPT-2, and it never
touches the original model (which is the teacher and shares its tensors)."""

from __future__ import annotations

from statistics import mean

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import main
from evaluation.perplexity import perplexity
import export.heal
from config import HealSpec
from export.heal import heal, kd_loss, training_ids
from models.removal import removed_blocks, removed_units
from tiny import make_model, make_text, make_tokenizer, save_model_dir
from utils.data import tokenize



@pytest.fixture(scope="module")
def corpus():
    """Tokenizer, training ids and held-out evaluation ids from different generated text."""
    train_text = make_text(600, seed=0)
    tokenizer = make_tokenizer(train_text)
    return tokenizer, tokenize(tokenizer, train_text), tokenize(tokenizer, make_text(120, seed=1))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def eval_ppl(model, ids) -> float:
    return perplexity(model, ids, max_length=64, stride=32, progress=False).perplexity


def test_lora_healing_lowers_training_loss_and_evaluation_perplexity(corpus):
    _, train_ids, eval_ids = corpus
    model = make_model()
    original = snapshot(model)
    with removed_blocks(model, [1]) as pruned:
        before = eval_ppl(pruned, eval_ids)

    result = heal(model, [1], train_ids, HealSpec(steps=20, lr=1e-2, batch_size=4, seq_len=64), progress=False)

    assert len(result.losses) == 20
    assert mean(result.losses[-5:]) < mean(result.losses[:5])
    assert eval_ppl(result.model, eval_ids) < before
    assert unchanged(model, original), "healing wrote to the original model"


def test_merged_lora_model_is_a_plain_gpt2_of_the_pruned_shape(corpus):
    _, train_ids, _ = corpus
    model = make_model(n_layer=4)
    result = heal(model, [0, 2], train_ids, HealSpec(steps=3, lr=1e-2, batch_size=2, seq_len=32),
                  progress=False)
    healed = result.model

    plain = GPT2LMHeadModel(GPT2Config(**{**model.config.to_dict(), "n_layer": 2}))
    assert type(healed) is GPT2LMHeadModel
    assert healed.config.n_layer == 2
    assert set(healed.state_dict()) == set(plain.state_dict())
    assert not any("lora" in key for key in healed.state_dict())
    assert [block.attn.layer_idx for block in healed.transformer.h] == [0, 1]
    # kept block 1 of the original is block 0 of the healed model: LoRA changed its
    # projections, and left what it does not adapt (embeddings, layer norms) alone
    assert not torch.equal(healed.transformer.h[0].attn.c_attn.weight, model.transformer.h[1].attn.c_attn.weight)
    assert torch.equal(healed.transformer.h[0].ln_1.weight, model.transformer.h[1].ln_1.weight)
    assert torch.equal(healed.transformer.wte.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_healing_keeps_removed_sublayers_removed(corpus, mode):
    """Block 0, the attention of block 2 and the MLP of block 3 removed: the student is the zeroed
    copy the export writes, its zeroed projections stay zero, and what they gate adds nothing."""
    _, train_ids, eval_ids = corpus
    model = make_model(n_layer=4)
    original = snapshot(model)
    removed = (0, "attn2", "mlp3")
    with removed_units(model, removed) as pruned:
        before = eval_ppl(pruned, eval_ids)
    lr = 1e-2 if mode == "lora" else 1e-3
    healed = heal(model, removed, train_ids, HealSpec(steps=8, mode=mode, lr=lr, batch_size=4, seq_len=64),
                  progress=False).model

    assert type(healed) is GPT2LMHeadModel and healed.config.n_layer == 3
    attn2, mlp3 = healed.transformer.h[1].attn.c_proj, healed.transformer.h[2].mlp.c_proj
    for proj in (attn2, mlp3):
        assert not proj.weight.any() and not proj.bias.any(), "a removed sublayer came back"
    # everything else trained: the kept attention of block 2 and the kept MLP of block 3 included
    assert not torch.equal(healed.transformer.h[1].mlp.c_fc.weight, model.transformer.h[2].mlp.c_fc.weight)
    assert not torch.equal(healed.transformer.h[2].attn.c_attn.weight, model.transformer.h[3].attn.c_attn.weight)
    assert eval_ppl(healed, eval_ids) < before
    # what a zeroed projection gates adds nothing: new weights inside it leave the logits as they are
    inputs = eval_ids[None, :32]
    with torch.no_grad():
        logits = healed(inputs).logits
        healed.transformer.h[1].attn.c_attn.weight.normal_()
        healed.transformer.h[2].mlp.c_fc.weight.normal_()
        assert torch.equal(healed(inputs).logits, logits)
    assert unchanged(model, original)


def test_full_distillation_moves_the_student_towards_the_unpruned_teacher(corpus):
    _, train_ids, eval_ids = corpus
    model = make_model()
    with torch.no_grad():  # larger blocks, so that removing two of them visibly changes the output
        for p in model.transformer.h.parameters():
            p.mul_(3)
    original = snapshot(model)
    held_out = eval_ids[:256].view(4, 64)
    with torch.no_grad():
        teacher = model(held_out).logits
        with removed_blocks(model, [1, 2]) as pruned:
            kl_before = kd_loss(pruned(held_out).logits, teacher).item()

    result = heal(model, [1, 2], train_ids, HealSpec(steps=15, mode="full", kd=True, lr=1e-3, batch_size=4,
                                                         seq_len=64), progress=False)

    with torch.no_grad():
        kl_after = kd_loss(result.model(held_out).logits, teacher).item()
    assert mean(result.losses[-5:]) < mean(result.losses[:5])
    assert kl_after < kl_before
    assert unchanged(model, original), "full fine-tuning wrote to the teacher's (shared) weights"
    assert model.config.n_layer == 4 and len(model.transformer.h) == 4


@pytest.fixture(scope="module")
def files(tmp_path_factory, corpus):
    tokenizer, _, _ = corpus
    root = tmp_path_factory.mktemp("heal")
    save_model_dir(root / "model", make_model(), tokenizer)
    (root / "train.txt").write_text(make_text(600, seed=0), encoding="utf-8")
    (root / "eval.txt").write_text(make_text(120, seed=1), encoding="utf-8")
    (root / "short.txt").write_text("A few words.", encoding="utf-8")
    return root


@pytest.mark.parametrize("extra, message", [
    ([], "pass --train-dataset"),
    (["--train-dataset", "{root}/eval.txt"], "training text is the evaluation text"),
    (["--train-dataset", "{root}/short.txt"], "fewer than --heal-seq-len"),
    (["--train-dataset", "{root}/train.txt", "--heal-seq-len", "500"], "exceeds the model's context size"),
    (["--train-dataset", "{root}/missing.txt"], "does not exist"),
])
def test_bad_healing_input_is_a_one_line_error_before_any_results(files, capsys, extra, message):
    out_dir = files / "results"
    argv = ["--mode", "custom", "--remove", "1", "--model", str(files / "model"), "--dataset",
            str(files / "eval.txt"), "--heal-steps", "2", "--no-speed", "--save-results", "--output-dir",
            str(out_dir), *[arg.format(root=files) for arg in extra]]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_healing_options_need_heal_steps_and_a_mode_with_one_chosen_configuration(files, capsys):
    common = ["--model", str(files / "model"), "--dataset", str(files / "eval.txt"), "--no-speed"]
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--mode", "custom", "--remove", "1", "--heal-kd", *common])
    assert exit_info.value.code == 2
    assert "needs --heal-steps" in capsys.readouterr().err
    assert main.main(["--mode", "sequential", "--heal-steps", "2", "--train-dataset", str(files / "train.txt"),
                      *common]) == 2
    assert "--heal-steps works with --mode random, custom, importance, greedy, beam, evolve, not sequential" in capsys.readouterr().err


def test_training_text_defaults_to_the_train_split_of_a_hub_dataset(monkeypatch):
    asked = []
    monkeypatch.setattr(export.heal, "cached_token_ids",
                        lambda tokenizer, name, split, column, cache_dir: asked.append((name, split)) or "text")
    assert training_ids(None, None, "wikitext-2-raw-v1") == "text"
    assert training_ids(None, "my/corpus", "wikitext-2-raw-v1") == "text"
    assert asked == [("wikitext-2-raw-v1", "train"), ("my/corpus", "train")]


@pytest.mark.parametrize("family", ["gpt_neo", "gpt_neox", "llama", "opt", "qwen2"])
def test_lora_healing_merges_into_a_plain_model_of_every_family(family, corpus):
    from test_families import build  # the tiny model of each family the kit prunes

    tokenizer, train_ids, _ = corpus
    model = build(family, len(tokenizer))
    original = snapshot(model)
    with removed_blocks(model, [1]) as pruned:
        pruned_keys, pruned_class = set(pruned.state_dict()), type(pruned)
    result = heal(model, [1], train_ids, HealSpec(steps=2, lr=1e-2, batch_size=2, seq_len=16), progress=False)
    assert type(result.model) is pruned_class
    assert set(result.model.state_dict()) == pruned_keys
    assert unchanged(model, original)
