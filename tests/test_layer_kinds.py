"""Gemma 2, Gemma 3, Qwen3 and Phi-3 specifics: each block keeps its attention kind wherever it moves,
the exported config describes exactly the kept blocks, and Gemma's scaled embeddings, soft-capped
logits and normalized sublayer outputs are what the kit computes with.

The tests of every family (tests/test_families.py, tests/test_units.py) cover removal, reload, cached
decoding, the engine and sublayer units for these families too; here the models are deeper (6 blocks)
where the kinds must shift, and each expectation is built by hand from the model's own modules.
"""

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import main
from evaluation.params import kv_cache_bytes_per_token
from evaluation.perplexity import perplexity, scored_nll
from models.families import get_blocks, lm_head, record_block_calls
from models.removal import removed_blocks, removed_units, skipped_sublayer, zeroed_copy
from pruning.calibration import one_pass_scores
from test_families import FAMILIES, N_LAYER, build, cached_logits, gemma
from test_units import MIXED_KINDS

NEW = ["gemma2", "gemma3_text", "phi3", "qwen3"]
GEMMAS = ["gemma2", "gemma3_text"]
SLIDING, FULL = "sliding_attention", "full_attention"


@pytest.fixture(scope="module")
def ids(tokenizer, text) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"][:24]).view(1, -1)


def from_scratch(config, state: dict) -> torch.nn.Module:
    """A model of ``config``'s class built anew from the config and loaded with ``state``."""
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    model.load_state_dict(state)
    return model.eval()


# 6 blocks. Gemma 2: S F S F S F, block 1 (full) removed, so the sliding block 2 moves to position 1;
# Gemma 3: S S F S S F, block 2 (full) removed, so the sliding block 3 moves to position 2.
SHIFTS = {"gemma2": (1,), "gemma3_text": (2,)}


@pytest.mark.parametrize("family", GEMMAS)
@torch.no_grad()
def test_kinds_move_with_their_blocks_through_removal_and_reload(family, tokenizer, ids, tmp_path):
    model = gemma(family, len(tokenizer), n_layer=6)
    kinds = list(model.config.layer_types)
    assert kinds == ([SLIDING, FULL] * 3 if family == "gemma2" else [SLIDING, SLIDING, FULL] * 2)
    remove = SHIFTS[family]
    keep = [i for i in range(6) if i not in remove]
    kept_kinds = [kinds[i] for i in keep]
    assert kept_kinds != kinds[: len(keep)]  # the later blocks really change position kind

    with removed_blocks(model, remove) as pruned:
        blocks = get_blocks(pruned)
        assert pruned.config.layer_types == kept_kinds
        assert [b.self_attn.layer_type for b in blocks] == kept_kinds
        assert [b.self_attn.sliding_window for b in blocks] == [6 if k == SLIDING else None for k in kept_kinds]
        assert [b.self_attn.layer_idx for b in blocks] == list(range(5))
        logits = pruned(ids, use_cache=False).logits
        torch.testing.assert_close(cached_logits(pruned, ids, prefix=16), logits, rtol=1e-4, atol=1e-5)
        state = {k: v.clone() for k, v in pruned.state_dict().items()}
        # the pruned model is the model the sliced config builds, with the kept weights
        torch.testing.assert_close(from_scratch(pruned.config, state)(ids).logits, logits, rtol=0, atol=1e-6)
        # a config whose depth alone was rewritten describes the first five kinds, not the kept ones
        depth_only = copy.deepcopy(pruned.config)
        depth_only.layer_types = kinds[: len(keep)]
        assert not torch.allclose(from_scratch(depth_only, state)(ids).logits, logits, atol=1e-3)
        pruned.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == kept_kinds and saved["num_hidden_layers"] == 5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == kept_kinds
    assert [b.self_attn.layer_type for b in get_blocks(reloaded)] == kept_kinds
    torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=1e-6)
    assert model.config.layer_types == kinds and model.config.num_hidden_layers == 6


@torch.no_grad()
def test_gemma3_keeps_its_pattern_only_while_it_still_gives_the_kept_kinds(tokenizer, tmp_path):
    """A stale sliding_window_pattern is cleared, so no tool re-derives the kinds from it."""
    model = gemma("gemma3_text", len(tokenizer), n_layer=6)
    with removed_blocks(model, (2,)) as pruned:  # S S S S F: not the pattern's S S F S S
        assert pruned.config.sliding_window_pattern is None and pruned.config._sliding_window_pattern is None
        pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sliding_window_pattern"] is None and saved["layer_types"] == [SLIDING] * 4 + [FULL]
    with removed_blocks(model, (3, 4, 5)) as pruned:  # S S F: still the pattern of 3
        assert pruned.config.sliding_window_pattern == 3 and pruned.config.layer_types == [SLIDING, SLIDING, FULL]
    assert model.config.sliding_window_pattern == 3 == model.config._sliding_window_pattern


@torch.no_grad()
def test_gemma3_blocks_get_the_rotary_embedding_of_their_kind(tokenizer, ids):
    """Local (theta 10k) for sliding blocks, global (theta 1M) for full ones, wherever the block moved."""
    model = gemma("gemma3_text", len(tokenizer), n_layer=6)
    with removed_blocks(model, (2,)) as pruned:
        hidden, calls = record_block_calls(pruned, ids)
        positions = torch.arange(ids.shape[1]).view(1, -1)
        for call, kind in zip(calls, pruned.config.layer_types):
            cos, sin = pruned.model.rotary_emb(hidden, positions, kind)
            assert torch.equal(call.kwargs["position_embeddings"][0], cos)
            assert torch.equal(call.kwargs["position_embeddings"][1], sin)
        local = pruned.model.rotary_emb(hidden, positions, SLIDING)[0]
        assert not torch.allclose(local, pruned.model.rotary_emb(hidden, positions, FULL)[0])


@pytest.mark.parametrize("family", GEMMAS)
@torch.no_grad()
def test_gemma_embeddings_are_scaled_by_the_square_root_of_the_width(family, tokenizer, ids):
    model = build(family, len(tokenizer))
    hidden, _ = record_block_calls(model, ids)
    expected = model.model.embed_tokens.weight[ids[0]] * torch.tensor(math.sqrt(32.0))
    torch.testing.assert_close(hidden[0], expected, rtol=1e-6, atol=0)


@torch.no_grad()
def test_gemma2_perplexity_uses_its_soft_capped_logits(tokenizer, ids):
    model = build("gemma2", len(tokenizer))
    hidden = model.model(ids).last_hidden_state
    assert torch.equal(lm_head(model)(hidden), model(ids).logits)
    raw = model.get_output_embeddings()(hidden)
    assert not torch.allclose(raw, model(ids).logits, atol=1e-3)  # the cap (0.3) matters for this model
    rows, positions, targets = torch.zeros(23, dtype=torch.long), torch.arange(23), ids[0, 1:]
    capped = torch.nn.functional.cross_entropy(0.3 * torch.tanh(raw[0, :23] / 0.3), targets, reduction="sum")
    assert scored_nll(lm_head(model), hidden, rows, positions, targets) == pytest.approx(capped.item(), rel=1e-6)
    result = perplexity(model, ids[0], max_length=24, stride=24, progress=False)
    assert result.nll_sum == pytest.approx(capped.item(), rel=1e-6)


@pytest.mark.parametrize("family", GEMMAS)
@torch.no_grad()
def test_a_skipped_gemma_sublayer_takes_its_output_norm_with_it(family, tokenizer, ids):
    """Gemma adds norm(sublayer(x)) to the stream; a skipped sublayer adds nothing, its norm included."""
    model = build(family, len(tokenizer))
    hidden, calls = record_block_calls(model, ids)
    block, call = get_blocks(model)[0], calls[0]
    with skipped_sublayer(model, block, "attn"):
        expected = hidden + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(hidden)))
        assert torch.equal(call(block, hidden), expected)
    with skipped_sublayer(model, block, "mlp"):
        attention, _ = block.self_attn(hidden_states=block.input_layernorm(hidden),
                                       position_embeddings=call.kwargs["position_embeddings"],
                                       attention_mask=call.kwargs["attention_mask"])
        assert torch.equal(call(block, hidden), hidden + block.post_attention_layernorm(attention))


# Block 1 and sublayers of the others, each set keeping the real attentions on cache layers of their kinds.
ZEROED = {"gemma2": [1, "attn3"], "gemma3_text": [1, "attn3", "mlp0"], "phi3": [1, "attn2", "mlp3"],
          "qwen3": [1, "attn2", "mlp0"]}


@pytest.mark.parametrize("family", NEW)
@torch.no_grad()
def test_a_zeroed_sublayer_copy_reloads_to_the_skipped_sublayers_logits(family, tokenizer, ids, tmp_path):
    """The partial-block export: output projections zeroed (Phi-3's fused qkv_proj and gate_up_proj
    stay; its o_proj and down_proj are zeroed), the kinds still sliced; plain transformers reloads it."""
    model = build(family, len(tokenizer))
    removal = ZEROED[family]
    with removed_units(model, removal) as pruned:
        expected = pruned(ids).logits
        kinds = getattr(pruned.config, "layer_types", None)
    copy_ = zeroed_copy(model, removal)
    assert copy_.config.num_hidden_layers == N_LAYER - 1
    assert getattr(copy_.config, "layer_types", None) == kinds
    torch.testing.assert_close(copy_(ids).logits, expected, rtol=0, atol=1e-6)
    copy_.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_stream_after_an_attention_is_what_the_block_adds(family, tokenizer, ids):
    """Calibration's middle boundary of block 0 is the block run with its MLP skipped (for Gemma: the
    stream plus the normalized attention output, not the raw one)."""
    model = build(family, len(tokenizer))
    hidden, calls = record_block_calls(model, ids)
    block = get_blocks(model)[0]
    with skipped_sublayer(model, block, "mlp"):
        out = calls[0](block, hidden)
        after = (out[0] if isinstance(out, tuple) else out)[0].double()
    entering = hidden[0].double()
    cos = torch.nn.functional.cosine_similarity(entering, after, dim=-1).clamp(-1, 1).mean().item()
    scores = one_pass_scores(model, ids[0], max_length=ids.shape[1], progress=False)
    assert scores.cos[0, 1].item() == pytest.approx(cos, abs=1e-9)


def kv_bytes_per_attention(config) -> int:
    """2 (keys, values) x KV heads x head width x 4 bytes (float32)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * 4


@pytest.mark.parametrize("family", NEW)
def test_kv_cache_bytes_count_the_attentions_that_run(family, tokenizer):
    model = build(family, len(tokenizer))
    per = kv_bytes_per_attention(model.config)
    assert kv_cache_bytes_per_token(model) == N_LAYER * per
    with removed_blocks(model, (1,)) as pruned:
        assert kv_cache_bytes_per_token(pruned) == (N_LAYER - 1) * per
    attention = [u for u in MIXED_KINDS.get(family, ["attn2"]) if u.startswith("attn")]
    with removed_units(model, attention) as pruned:
        assert kv_cache_bytes_per_token(pruned) == (N_LAYER - 1) * per


@pytest.mark.parametrize("family, remove", [("gemma2", "1,attn3"), ("gemma3_text", "2,attn3"), ("phi3", "0,mlp2"),
                                            ("qwen3", "1,mlp0")])
def test_custom_mode_exports_a_checkpoint_that_reloads_to_the_pruned_model(family, remove, tokenizer, text,
                                                                          tmp_path):
    """The kit's own export (checked by reloading it, export.checkpoint.verify_reload) on each new family,
    with a whole block (Gemma: a full-attention one) and a sublayer removed."""
    model_dir, target = tmp_path / "model", tmp_path / "pruned"
    model = build(family, len(tokenizer))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    assert main.main(["--mode", "custom", "--remove", remove, "--model", str(model_dir), "--dataset",
                      str(tmp_path / "corpus.txt"), "--max-tokens", "300", "--max-length", "32", "--no-speed",
                      "--quiet", "--save_results", "--output-dir", str(tmp_path / "out"),
                      "--save-model", str(target)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    units = [int(u) if u.isdigit() else u for u in remove.split(",")]
    inputs = torch.tensor(tokenizer(text)["input_ids"][:24]).view(1, -1)
    with removed_units(model, units) as pruned, torch.no_grad():
        assert getattr(reloaded.config, "layer_types", None) == getattr(pruned.config, "layer_types", None)
        torch.testing.assert_close(reloaded(inputs).logits, pruned(inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_per_block_config_list_is_sliced_with_the_blocks(family, tokenizer):
    """A config list with one entry per block that removal did not slice would describe the wrong blocks."""
    model = build(family, len(tokenizer))
    per_block = {k for k, v in model.config.to_dict().items() if isinstance(v, list) and len(v) == N_LAYER}
    with removed_blocks(model, (1,)) as pruned:
        fields = pruned.config.to_dict()
        assert all(len(fields[k]) == N_LAYER - 1 for k in per_block), per_block
