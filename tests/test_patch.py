"""--patch: training-free compensation of removed blocks by a fitted linear
map merged into the weights (pruning.compensation, models.compensation)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import main
from config import HealSpec, PATCHES
from evaluation.engine import run_pass
from evaluation.params import count_parameters
from evaluation.perplexity import perplexity
from export.heal import heal
from models.compensation import Map, Patch, applied, check_patchable, merge_map, removed_runs, scaled_contributions
from models.families import FAMILIES as REGISTRY
from models.families import get_blocks, module_at, record_block_calls
from models.removal import removed_blocks
from pruning.compensation import METHODS, NONE, cosine_distance, fit_patch, solve_cosine, solve_lstsq
from reporting.csvfile import read_rows
from test_families import build
from tiny import make_model, make_text, make_tokenizer, save_model_dir, train_briefly
from utils.data import tokenize
from utils.errors import KitError

WINDOW = 64


@pytest.fixture(scope="module")
def corpus():
    """Tokenizer, calibration (training) ids and held-out evaluation ids of the generated text."""
    train_text = make_text(600, seed=0)
    tokenizer = make_tokenizer(train_text)
    return tokenizer, tokenize(tokenizer, train_text), tokenize(tokenizer, make_text(120, seed=1))


@pytest.fixture(scope="module")
def trained(corpus):
    """A tiny GPT-2 trained briefly, so that its blocks do real work."""
    tokenizer, train_ids, _ = corpus
    return train_briefly(make_model(n_layer=4, vocab_size=len(tokenizer)), train_ids, steps=60)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.view(1, -1)).logits


def three_logits(model, removed, patch, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits of the unpruned model, of the pruned one, and of the pruned one patched."""
    original = logits(model, ids)
    with removed_blocks(model, removed) as pruned:
        plain = logits(pruned, ids)
        with applied(pruned, patch):
            return original, plain, logits(pruned, ids)


def ppl(model, ids) -> float:
    return perplexity(model, ids, max_length=WINDOW, stride=32, progress=False).perplexity


def test_the_method_choices_are_the_registry():
    assert PATCHES == (NONE, *METHODS)


def test_removed_runs_are_the_maximal_runs_of_consecutive_blocks():
    assert removed_runs((0, 1, 4, 6, 7, 8)) == [(0, 1), (4, 4), (6, 8)]
    assert removed_runs(()) == []


MAPS = [name for name, m in METHODS.items() if not m.scales]


@pytest.mark.parametrize("method", MAPS)
def test_an_identity_block_gives_the_identity_map(method, corpus):
    tokenizer, train_ids, _ = corpus
    model = make_model(n_layer=4, vocab_size=len(tokenizer), identity=(2,))
    patch = fit_patch(model, [2], method, train_ids[:1024], WINDOW, progress=False)
    (m,) = patch.maps
    torch.testing.assert_close(m.matrix, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-12)
    assert m.info["tokens"] == 1024 and m.info["system_bytes"] == 2 * 32 * 32 * 8


def test_an_identity_block_gives_the_scale_one(corpus):
    tokenizer, train_ids, eval_ids = corpus
    model = make_model(n_layer=4, vocab_size=len(tokenizer), identity=(2,))
    patch = fit_patch(model, [2], "magnitude", train_ids[:1024], WINDOW, progress=False)
    assert patch.maps[0].info["scale"] == 1.0 and patch.maps[0].info["tokens"] == 1024
    with removed_blocks(model, [2]) as pruned:
        plain = logits(pruned, eval_ids[:WINDOW])
        with applied(pruned, patch):
            assert torch.equal(logits(pruned, eval_ids[:WINDOW]), plain)


def tiny_norm_eps(model: nn.Module) -> nn.Module:
    """Every norm's epsilon made negligible, so that scaling a norm's input changes nothing measurable."""
    for module in model.modules():
        for name in ("eps", "variance_epsilon"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 1e-12)
    return model


@torch.no_grad()
def test_a_removed_block_that_only_scales_the_stream_is_recovered_by_magnitude(corpus):
    """Block 1 leaves 2.5 times the stream it receives: removing it and dividing every later block's
    contributions by the measured scale gives the unpruned model's logits."""
    tokenizer, train_ids, eval_ids = corpus
    torch.manual_seed(0)
    model = tiny_norm_eps(LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=4, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=len(tokenizer), max_position_embeddings=128)).eval())
    block = model.model.layers[1]
    block.self_attn.o_proj.weight.zero_()
    block.post_attention_layernorm = nn.Identity()
    block.mlp = nn.Linear(16, 16, bias=False)
    block.mlp.weight.copy_(1.5 * torch.eye(16))
    patch = fit_patch(model, [1], "magnitude", train_ids[:1024], WINDOW, progress=False)
    assert patch.maps[0].info["scale"] == pytest.approx(2.5, rel=1e-6)
    assert patch.merged_into == ("blocks 2..3 (what they add divided by 2.5)",)
    original, plain, patched = three_logits(model, [1], patch, eval_ids[:WINDOW])
    assert not torch.allclose(plain, original, atol=1e-2)
    torch.testing.assert_close(patched, original, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", sorted(REGISTRY))
@torch.no_grad()
def test_dividing_what_later_blocks_add_equals_scaling_the_stream_they_receive(family, corpus):
    """What magnitude merges, in every family (Gemma scales its post norms): later blocks' contributions
    divided by 3 give the logits of the model whose stream entering block 1 is multiplied by 3."""
    tokenizer, train_ids, _ = corpus
    model = tiny_norm_eps(build(family, len(tokenizer)))
    blocks, ids = get_blocks(model), train_ids[:24].view(1, -1)

    def times_three(module, args, kwargs):
        if args:
            return (args[0] * 3, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 3}

    handle = blocks[1].register_forward_pre_hook(times_three, with_kwargs=True)
    try:
        expected = model(input_ids=ids).logits
    finally:
        handle.remove()
    plain = model(input_ids=ids).logits
    with applied(model, Patch("magnitude", (), replacements=scaled_contributions(
            model, {j: 1 / 3 for j in range(1, len(blocks))}))):
        got = model(input_ids=ids).logits
    assert not torch.allclose(plain, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def linear_llama(vocab: int, d: int = 16) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """A Llama whose block 1 adds exactly M W to the stream, M being block 0's MLP output.

    Block 0's attention adds nothing and its MLP writes only the second half of the coordinates, the
    embeddings only the first half; block 1's attention adds nothing and its MLP is the linear map W,
    which reads only the second half. So the stream leaving block 1 is h_mid + M (I + W): exactly
    linear in what the map sees, with T = I + W.
    """
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=3, hidden_size=d, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=32, vocab_size=vocab, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    half = d // 2
    model.model.embed_tokens.weight[:, half:] = 0
    b0, b1 = model.model.layers[0], model.model.layers[1]
    b0.self_attn.o_proj.weight.zero_()
    b0.mlp.down_proj.weight[:half] = 0
    b1.self_attn.o_proj.weight.zero_()
    w = torch.randn(d, d) * 0.3
    w[:half] = 0
    b1.post_attention_layernorm = nn.Identity()
    b1.mlp = nn.Linear(d, d, bias=False)
    b1.mlp.weight.copy_(w.T)
    return model, w


def test_a_removed_block_that_is_linear_in_what_the_map_sees_is_recovered_exactly(corpus):
    tokenizer, train_ids, eval_ids = corpus
    model, w = linear_llama(len(tokenizer))
    patch = fit_patch(model, [1], "lstsq", train_ids[:2048], WINDOW, progress=False)
    torch.testing.assert_close(patch.maps[0].matrix, torch.eye(16, dtype=torch.float64) + w.double(),
                               rtol=0, atol=1e-5)
    assert patch.merged_into == ("block 0's mlp.down_proj (block 0 of the pruned model)",)
    original, plain, patched = three_logits(model, [1], patch, eval_ids[:WINDOW])
    assert not torch.allclose(plain, original, atol=1e-3)
    torch.testing.assert_close(patched, original, rtol=0, atol=1e-4)
    assert torch.equal(logits(model, eval_ids[:WINDOW]), original), "the patch was not restored"


@torch.no_grad()
def linear_first_block(model) -> torch.Tensor:
    """GPT-2's block 0 made to add X0 W to the stream entering it; returns W."""
    block, d = model.transformer.h[0], model.config.n_embd
    block.attn.c_proj.weight.zero_()
    block.attn.c_proj.bias.zero_()
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(1)) * 0.2
    block.ln_2 = nn.Identity()
    block.mlp = nn.Linear(d, d, bias=False)
    block.mlp.weight.copy_(w.T)
    return w


def test_a_run_from_block_0_goes_into_the_embeddings_and_unties_the_lm_head(corpus):
    tokenizer, train_ids, eval_ids = corpus
    model = make_model(n_layer=3, vocab_size=len(tokenizer))
    w = linear_first_block(model)
    head = model.lm_head.weight.detach().clone()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    patch = fit_patch(model, [0], "lstsq", train_ids[:2048], WINDOW, progress=False)
    torch.testing.assert_close(patch.maps[0].matrix, torch.eye(32, dtype=torch.float64) + w.double(),
                               rtol=0, atol=1e-5)
    assert patch.untied and patch.merged_into == ("transformer.wte + transformer.wpe",)
    original, params = logits(model, eval_ids[:WINDOW]), count_parameters(model)
    block_0, embedding = (sum(p.numel() for p in m.parameters()) for m in (model.transformer.h[0],
                                                                          model.transformer.wte))
    with removed_blocks(model, [0]) as pruned, applied(pruned, patch):
        # the position embeddings are mapped too, and the LM head keeps the original matrix
        torch.testing.assert_close(logits(pruned, eval_ids[:WINDOW]), original, rtol=0, atol=1e-4)
        assert torch.equal(pruned.lm_head.weight, head) and pruned.config.tie_word_embeddings is False
        assert count_parameters(pruned) == params - block_0 + embedding
    assert model.lm_head.weight is model.transformer.wte.weight and model.config.tie_word_embeddings is True


@pytest.mark.parametrize("family", sorted(REGISTRY))
@torch.no_grad()
def test_a_merged_map_multiplies_exactly_what_it_is_merged_into(family, corpus):
    """Weight orientation of every family (GPT-2's Conv1D stores (in, out)), and the embeddings' sum."""
    tokenizer, train_ids, _ = corpus
    model = build(family, len(tokenizer))
    d = model.config.hidden_size
    t = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=torch.Generator().manual_seed(2),
                                                              dtype=torch.float64)
    ids = train_ids[:24].view(1, -1)
    out = module_at(get_blocks(model)[0], REGISTRY[family].mlp_out)
    x = torch.randn(5, out.weight.shape[1 if not REGISTRY[family].transposed_linears else 0])
    before, entering = out(x), record_block_calls(model, ids)[0]
    with applied(model, merge_map(model, Map(1, 1, t), "lstsq", (1,))):
        torch.testing.assert_close(out(x), (before.double() @ t).float(), rtol=1e-5, atol=1e-5)
    with applied(model, merge_map(model, Map(0, 0, t), "lstsq", (0,))):
        torch.testing.assert_close(record_block_calls(model, ids)[0], (entering.double() @ t).float(),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(out(x), before)


def test_patched_perplexity_is_below_plain_on_a_trained_model(trained, corpus):
    """The maps; magnitude's single scale is not always better (on this toy it makes block 1 worse)."""
    _, train_ids, eval_ids = corpus
    for removed in ([1], [1, 2], [0, 2]):
        with removed_blocks(trained, removed) as pruned:
            plain = ppl(pruned, eval_ids)
        for method in MAPS:
            patch = fit_patch(trained, removed, method, train_ids[:4096], WINDOW, progress=False)
            assert len(patch.maps) == len(removed_runs(removed))
            with removed_blocks(trained, removed) as pruned, applied(pruned, patch):
                assert ppl(pruned, eval_ids) < plain, (removed, method)


@pytest.mark.parametrize("method", ["lstsq", "magnitude"])
def test_the_engine_shares_the_blocks_before_a_patch_and_matches_one_model_at_a_time(method, trained, corpus):
    _, train_ids, eval_ids = corpus
    sets = [(2,), (1, 2), (3,), (1,)]
    patches = [fit_patch(trained, s, method, train_ids[:1024], WINDOW, progress=False) for s in sets[:3]] + [None]
    results, work = run_pass(trained, eval_ids, sets, WINDOW, 32, patches=patches, compare=True)
    for removed, patch, result in zip(sets, patches, results):
        with removed_blocks(trained, removed) as pruned, applied(pruned, patch):
            assert result.ppl.perplexity == ppl(pruned, eval_ids), (removed, method)
        assert result.ppl_interval is not None
    # Per window: the baseline's chain of 4 blocks, then each configuration's blocks past what it shares.
    # lstsq patches the block before the run: (2,) shares block 0 and adds its patched 1 and 3; (1, 2) patches
    # block 0 itself and adds 2 nodes; (3,) shares 0 and 1 and adds its patched 2; (1,) shares 0 and adds 2.
    # magnitude patches the blocks after the run: (2,) shares 0 and 1 and adds its scaled 3; (1, 2) shares 0
    # and adds 1; (3,) has no block after the run to scale and ends on the baseline's chain; (1,) adds 2.
    nodes = {"lstsq": 4 + 2 + 2 + 1 + 2, "magnitude": 4 + 1 + 1 + 0 + 2}[method]
    assert work.block_evals == nodes * work.windows
    assert work.naive_block_evals == (4 + 3 + 2 + 3 + 3) * work.windows


def test_the_engine_refuses_a_patch_of_the_embeddings(trained, corpus):
    _, train_ids, eval_ids = corpus
    patch = fit_patch(trained, (0,), "lstsq", train_ids[:1024], WINDOW, progress=False)
    with pytest.raises(ValueError, match="embeddings"):
        run_pass(trained, eval_ids, [(0,)], WINDOW, 32, patches=[patch])


def test_cosine_beats_least_squares_on_its_own_objective():
    """Targets scaled per token: the cosine is blind to the scale, least squares is not."""
    gen = torch.Generator().manual_seed(0)
    m, s = torch.randn(400, 8, generator=gen, dtype=torch.float64), torch.randn(400, 8, generator=gen, dtype=torch.float64)
    true = 0.5 * torch.randn(8, 8, generator=gen, dtype=torch.float64)
    y = (s + m @ true) * torch.rand(400, 1, generator=gen, dtype=torch.float64).mul(3).add(0.2)
    start = solve_lstsq(m.T @ m, m.T @ (y - s))
    fitted = solve_cosine(m, s, y, start, steps=300, lr=1e-2)
    assert cosine_distance(m, s, y, fitted).item() < 0.2 * cosine_distance(m, s, y, start).item()
    assert cosine_distance(m, s, y, true).item() < 1e-12  # the objective's minimum, for reference


def test_sublayers_and_a_post_norm_opt_are_refused(corpus):
    tokenizer, _, _ = corpus
    with pytest.raises(KitError, match=r"sublayers \(attn1\)"):
        check_patchable(make_model(), (0, "attn1"))
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, ffn_dim=32,
                                   vocab_size=len(tokenizer), word_embed_proj_dim=16,
                                   do_layer_norm_before=False)).eval()
    with pytest.raises(KitError, match="do_layer_norm_before"):
        check_patchable(opt, (1,))
    gemma = build("gemma2", len(tokenizer))
    with pytest.raises(KitError, match=r"normalizes that output \(post_feedforward_layernorm\).*magnitude"):
        check_patchable(gemma, (1,))
    assert check_patchable(gemma, (1,), maps=False) == [(1, 1)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained, corpus):
    tokenizer, _, _ = corpus
    root = tmp_path_factory.mktemp("patch")
    save_model_dir(root / "model", trained, tokenizer)
    (root / "text.txt").write_text(make_text(600, seed=0), encoding="utf-8")
    return root


def kit(files, out: str, *extra: str) -> list[dict]:
    argv = ["--model", str(files / "model"), "--dataset", str(files / "text.txt"), "--max-length", "64",
            "--max-tokens", "2048", "--calib-tokens", "2048", "--no-speed", "--save-results", "--output-dir",
            str(files / out), "--quiet", *extra]
    assert main.main(argv) == 0
    (csv_file,) = (files / out).glob("*.csv")
    return read_rows(str(csv_file))


def kit_patched(files, removed, method: str) -> tuple[nn.Module, torch.Tensor]:
    """The kit's patched model, computed here from the saved model and the calibration tokens the run takes
    (a local file: the --calib-tokens after the --max-tokens evaluated ones)."""
    model = AutoModelForCausalLM.from_pretrained(files / "model").eval()
    tokenizer = make_tokenizer(make_text(600, seed=0))
    ids = tokenize(tokenizer, (files / "text.txt").read_text(encoding="utf-8"))
    return model, fit_patch(model, removed, method, ids[2048:4096], WINDOW, progress=False), ids


def test_custom_mode_patches_exports_a_plain_checkpoint_and_records_the_fit(files, capsys):
    rows = kit(files, "custom", "--mode", "custom", "--remove", "1,2", "--patch", "lstsq",
               "--save-model", str(files / "saved"))
    assert [r["patch"] for r in rows] == ["none", "lstsq"]
    model, patch, ids = kit_patched(files, (1, 2), "lstsq")
    with removed_blocks(model, [1, 2]) as pruned, applied(pruned, patch):
        assert rows[1]["perplexity"] == pytest.approx(
            perplexity(pruned, ids[:2048], max_length=WINDOW, stride=32, progress=False).perplexity, rel=1e-6)
        expected = logits(pruned, ids[:WINDOW])
    with removed_blocks(model, [1, 2]) as pruned:
        assert rows[1]["perplexity"] < perplexity(pruned, ids[:2048], max_length=WINDOW, stride=32,
                                                  progress=False).perplexity
    reloaded = AutoModelForCausalLM.from_pretrained(files / "saved").eval()
    assert reloaded.config.n_layer == 2 and type(reloaded).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(logits(reloaded, ids[:WINDOW]), expected, rtol=0, atol=1e-5)
    card = (files / "saved" / "README.md").read_text(encoding="utf-8")
    assert "## Compensation (training-free)" in card and "--patch lstsq" in card and "ReplaceMe" in card
    assert "block 0's mlp.c_proj (block 0 of the pruned model)" in card and "after the evaluated ones" in card
    report = json.loads((files / "saved" / "pruning_report.json").read_text(encoding="utf-8"))
    assert report["compensation"]["maps"][0]["removed_blocks"] == [1, 2]
    (sidecar,) = (files / "custom").glob("*.json")
    fits = json.loads(sidecar.read_text(encoding="utf-8"))["patch"]
    (fit,) = fits["configurations"].values()
    assert fits["calibration_tokens"] == 2048 and fit["maps"][0]["tokens"] == 2048 and fit["seconds"] > 0


def test_a_patched_export_from_block_0_reloads_untied(files):
    kit(files, "first", "--mode", "custom", "--remove", "0", "--patch", "cosine", "--save-model", str(files / "s0"))
    model, patch, ids = kit_patched(files, (0,), "cosine")
    with removed_blocks(model, [0]) as pruned, applied(pruned, patch):
        expected = logits(pruned, ids[:WINDOW])
    reloaded = AutoModelForCausalLM.from_pretrained(files / "s0").eval()
    assert reloaded.config.tie_word_embeddings is False
    assert reloaded.lm_head.weight.data_ptr() != reloaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(logits(reloaded, ids[:WINDOW]), expected, rtol=0, atol=1e-5)
    assert "unties them" in (files / "s0" / "README.md").read_text(encoding="utf-8")


def test_a_magnitude_patched_export_reloads_to_the_kits_model_and_its_card_names_the_scale(files):
    rows = kit(files, "magnitude", "--mode", "custom", "--remove", "1", "--patch", "magnitude",
               "--save-model", str(files / "s1"))
    model, patch, ids = kit_patched(files, (1,), "magnitude")
    with removed_blocks(model, [1]) as pruned, applied(pruned, patch):
        assert rows[1]["perplexity"] == pytest.approx(
            perplexity(pruned, ids[:2048], max_length=WINDOW, stride=32, progress=False).perplexity, rel=1e-6)
        expected = logits(pruned, ids[:WINDOW])
    reloaded = AutoModelForCausalLM.from_pretrained(files / "s1").eval()
    assert reloaded.config.n_layer == 3 and reloaded.config.tie_word_embeddings is True
    torch.testing.assert_close(logits(reloaded, ids[:WINDOW]), expected, rtol=0, atol=1e-5)
    card = (files / "s1" / "README.md").read_text(encoding="utf-8")
    scale = patch.maps[0].info["scale"]
    assert "Prune&Comp" in card and f"blocks 2..3 (what they add divided by {scale:.4g})" in card


def test_healing_starts_from_the_patched_model_and_the_teacher_stays_the_original(trained, corpus):
    _, train_ids, eval_ids = corpus
    original = {k: v.clone() for k, v in trained.state_dict().items()}
    patch = fit_patch(trained, [1], "lstsq", train_ids[:2048], WINDOW, progress=False)
    with removed_blocks(trained, [1]) as pruned, applied(pruned, patch):
        patched = logits(pruned, eval_ids[:WINDOW])
    result = heal(trained, [1], train_ids, HealSpec(steps=1, mode="full", lr=1e-12, batch_size=1, seq_len=32),
                  progress=False, patch=patch)
    torch.testing.assert_close(logits(result.model, eval_ids[:WINDOW]), patched, rtol=0, atol=1e-4)
    assert all(torch.equal(original[k], v) for k, v in trained.state_dict().items())


def test_compare_reports_each_pick_with_and_without_the_patch(files, capsys):
    rows = kit(files, "compare", "--mode", "compare", "--max-remove", "2", "--patch", "lstsq")
    capsys.readouterr()
    plain = {json.dumps(r["removed_layers"]) for r in rows if r["patch"] == "none"}
    patched = {json.dumps(r["removed_layers"]): r for r in rows if r["patch"] == "lstsq"}
    assert patched and set(patched) <= plain and "[]" not in patched
    assert main.main(["--mode", "report", "--input", str(next((files / "compare").glob("*.csv")))]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--mode", "baseline"], "--mode baseline removes none"),
    (["--mode", "sequential", "--unit", "attn"], "--unit attn removes sublayers"),
    (["--mode", "custom", "--remove", "1,attn2"], "removes sublayers (attn2)"),
])
def test_patch_refusals_are_one_line_errors(files, capsys, extra, message):
    argv = ["--model", str(files / "model"), "--dataset", str(files / "text.txt"), "--max-length", "64",
            "--no-speed", "--patch", "lstsq", *extra]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@torch.no_grad()
def with_a_scaling_block(trained: nn.Module, factor: float) -> nn.Module:
    """A copy of the trained GPT-2 with a block inserted after block 0 that only multiplies the stream by
    ``factor``, and what every later block adds multiplied by it too: the same model through the
    scale-invariant norms. Removing the inserted block plain costs a lot; magnitude undoes it exactly."""
    import copy

    model = tiny_norm_eps(copy.deepcopy(trained))
    scaler = copy.deepcopy(model.transformer.h[0])
    scaler.attn.c_proj.weight.zero_()
    scaler.attn.c_proj.bias.zero_()
    scaler.ln_2 = nn.Identity()
    scaler.mlp = nn.Linear(32, 32, bias=False)
    scaler.mlp.weight.copy_((factor - 1) * torch.eye(32))
    model.transformer.h.insert(1, scaler)
    for i, block in enumerate(model.transformer.h):
        block.attn.layer_idx = i
        if i > 1:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.mul_(factor)
                projection.bias.mul_(factor)
    model.config.n_layer = len(model.transformer.h)
    return model


def test_choosing_patched_picks_what_is_best_once_compensated(trained, corpus):
    """Removing the scaling block costs the most plain and nothing once its scale is divided out."""
    from pruning.calibration import Calibration
    from pruning.search import greedy

    _, train_ids, _ = corpus
    model = with_a_scaling_block(trained, 20.0)
    plain = Calibration(model, lambda: train_ids[:512], WINDOW, WINDOW, progress=False)
    patched = Calibration(model, lambda: train_ids[:512], WINDOW, WINDOW, progress=False, patch="magnitude")
    singles = [(i,) for i in range(5)]
    plain_ppl, patched_ppl = plain.perplexities(singles), patched.perplexities(singles)
    assert plain.perplexities([()])[0] == pytest.approx(Calibration(trained, lambda: train_ids[:512], WINDOW, WINDOW,
                                                                     progress=False).perplexities([()])[0], rel=1e-4)
    assert max(plain_ppl) == plain_ppl[1]
    assert patched_ppl[1] == pytest.approx(plain.perplexities([()])[0], rel=1e-4)
    assert greedy(plain.perplexities, 5, 1, progress=False)[0].removed != (1,)
    assert greedy(patched.perplexities, 5, 1, progress=False)[0].removed == (1,)
    # what the patched scoring cost, fits included, is what Calibration.cost_of says it costs
    assert (patched.cache.tokens, patched.cache.block_evals) == (patched.cost_of(singles).tokens,
                                                                 patched.cost_of(singles).block_evals)


def test_choosing_with_maps_scores_a_run_from_block_0_on_its_own(trained, corpus):
    """lstsq's map for block 0 goes into the embeddings: scored one model at a time, as the runner does."""
    from pruning.calibration import Calibration

    _, train_ids, _ = corpus
    calib = Calibration(trained, lambda: train_ids[:512], WINDOW, WINDOW, progress=False, patch="lstsq")
    sets = [(0,), (1,), (0, 1), (2, 3)]
    got = calib.perplexities(sets)
    for removed, value in zip(sets, got):
        patch = fit_patch(trained, removed, "lstsq", train_ids[:512], WINDOW, progress=False)
        with removed_blocks(trained, removed) as pruned, applied(pruned, patch):
            assert value == perplexity(pruned, train_ids[:512], max_length=WINDOW, stride=WINDOW,
                                       progress=False).perplexity
    assert (calib.cache.tokens, calib.cache.block_evals) == (calib.cost_of(sets).tokens,
                                                             calib.cost_of(sets).block_evals)


def test_greedy_chooses_patched_through_the_command_line(files, capsys):
    rows = kit(files, "chosen", "--mode", "greedy", "--num-remove", "2", "--patch", "magnitude", "--choose-patched")
    assert [r["patch"] for r in rows] == ["none", "magnitude", "magnitude"]
    assert "every candidate scored with its own --patch magnitude" in json.dumps(
        json.loads(next((files / "chosen").glob("*.json")).read_text(encoding="utf-8"))["choosing"])
    argv = ["--model", str(files / "model"), "--dataset", str(files / "text.txt"), "--mode", "greedy",
            "--num-remove", "1", "--choose-patched"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main.main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --choose-patched needs --patch METHOD (lstsq, cosine, magnitude)"
    with pytest.raises(SystemExit):  # bi reads one pass of the unpruned model: nothing to choose patched
        main.main([*argv[:4], "--mode", "importance", "--metric", "bi", "--num-remove", "1", "--patch", "magnitude",
                   "--choose-patched"])
    assert "--metric bi reads one pass of the unpruned model" in capsys.readouterr().err


def test_a_map_fitted_on_few_tokens_per_dimension_is_warned_about_once(trained, corpus, caplog):
    _, train_ids, _ = corpus
    with caplog.at_level("WARNING", logger="gpt2-pruning-kit"):
        for _ in range(2):
            fit_patch(trained, (1,), "lstsq", train_ids[:100], WINDOW, progress=False)
        fit_patch(trained, (1,), "lstsq", train_ids[:128], WINDOW, progress=False)  # 4 per dimension: enough
        fit_patch(trained, (1,), "magnitude", train_ids[:100], WINDOW, progress=False)  # a scale is one number
    warned = [r.getMessage() for r in caplog.records if "per dimension" in r.getMessage()]
    assert warned == ["--patch lstsq fits a 32 x 32 map on 100 calibration tokens, fewer than 4 per dimension: it "
                      "can fit the calibration text and not other text (docs/compensation.md); give --calib-tokens "
                      "128 or more, or use --patch magnitude"]


@pytest.mark.parametrize("method", ["lstsq", "magnitude"])
def test_the_fit_cost_the_kit_reports_is_the_blocks_the_fit_runs(method, trained, corpus):
    """fit_cost (what --choose-patched adds to a search's block evaluations) against the block calls counted
    by hooks while fitting two runs, on non-overlapping windows."""
    from pruning.compensation import fit_cost

    _, train_ids, _ = corpus
    calls = []
    handles = [b.register_forward_hook(lambda *_: calls.append(1)) for b in get_blocks(trained)]
    try:
        fit_patch(trained, (1, 3), method, train_ids[:300], WINDOW, progress=False)
    finally:
        for h in handles:
            h.remove()
    cost = fit_cost(4, (1, 3), method, 300, WINDOW)
    # 5 windows: run 1..1 is one pass through blocks 0-1; run 3..3 a pass through block 0 and 2 (the pruned
    # model up to block 2) and one through blocks 0-3 (the unpruned target)
    assert cost.block_evals == len(calls) == 5 * (2 + 2 + 4)
    assert cost.tokens == 3 * 300
