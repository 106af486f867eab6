"""Removing blocks leaves a normal, working model and an intact original."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from evaluation.params import count_parameters
from models.families import get_blocks
from models import removal
from models.removal import removed_blocks
from models.units import validate_removal
from utils.errors import KitError

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7]])


def test_pruned_model_is_a_smaller_model_sharing_the_original_blocks(model):
    originals = list(get_blocks(model))
    with removed_blocks(model, [0, 3]) as pruned:
        assert pruned.config.n_layer == pruned.config.num_hidden_layers == 2
        assert list(get_blocks(pruned)) == [originals[1], originals[2]]  # the same modules, not copies
        assert [b.attn.layer_idx for b in get_blocks(pruned)] == [0, 1]


def test_original_is_intact_after_pruning(model):
    before = model(IDS).logits
    params = {k: v.clone() for k, v in model.state_dict().items()}
    with removed_blocks(model, [1]) as pruned:
        assert not torch.equal(pruned(IDS).logits, before)
    assert model.config.n_layer == 4
    assert [b.attn.layer_idx for b in get_blocks(model)] == [0, 1, 2, 3]
    assert torch.equal(model(IDS).logits, before)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("remove", [[0], [1, 2], [0, 1, 3]])
def test_forward_cache_and_generate_work_after_pruning(model, remove):
    with removed_blocks(model, remove) as pruned:
        full = pruned(IDS, use_cache=False).logits
        # the cached path (prefix, then one token) must give the same last logits
        prefix = pruned(IDS[:, :-1], use_cache=True)
        assert len(prefix.past_key_values.layers) == 4 - len(remove)
        step = pruned(IDS[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
        torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
        out = pruned.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, pad_token_id=0)
        assert out.shape == (1, IDS.shape[1] + 6)


def test_save_and_reload_gives_the_same_logits(model, tmp_path):
    with removed_blocks(model, [0, 2]) as pruned:
        expected = pruned(IDS).logits
        pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.n_layer == 2
    assert torch.equal(reloaded(IDS).logits, expected)


def test_removing_an_identity_block_changes_no_logit(model):
    full = model(IDS).logits
    with removed_blocks(model, [2]) as pruned:
        assert torch.equal(pruned(IDS).logits, full)
    with removed_blocks(model, [1]) as pruned:
        assert not torch.equal(pruned(IDS).logits, full)


def test_parameters_drop_by_one_block_per_removed_block(model):
    total = count_parameters(model)
    block = sum(p.numel() for p in get_blocks(model)[0].parameters())
    for remove in ([0], [1, 3], [0, 1, 2]):
        with removed_blocks(model, remove) as pruned:
            assert count_parameters(pruned) == total - len(remove) * block


def test_distilgpt2_shape_has_the_parameter_counts_users_know():
    model = GPT2LMHeadModel(GPT2Config(n_layer=6))  # distilgpt2's shape, random weights
    assert round(count_parameters(model) / 1e6, 2) == 81.91  # tied wte/lm_head counted once
    with removed_blocks(model, [3]) as pruned:
        assert round(count_parameters(pruned) / 1e6, 2) == 74.82


@pytest.mark.parametrize("remove, message", [
    ([4], "out of range"), ([-1], "negative"), ([1, 1], "more than once"), ([0, 1, 2, 3], "cannot remove all"),
])
def test_bad_removals_are_refused(remove, message):
    with pytest.raises(KitError, match=message):
        validate_removal(remove, 4)


def test_a_failure_while_pruning_leaves_the_original_model(model, monkeypatch):
    before = [id(b) for b in get_blocks(model)]
    depth = model.config.n_layer

    def broken(*args):
        raise IndexError("a per-layer config field too short")

    monkeypatch.setattr(removal, "_set_depth", broken)
    with pytest.raises(IndexError):
        with removed_blocks(model, [1]):
            pass
    assert [id(b) for b in get_blocks(model)] == before
    assert model.config.n_layer == depth
    assert [b.attn.layer_idx for b in get_blocks(model)] == list(range(depth))
