"""Sliding-window perplexity: the windows, the number, and its edge cases."""

import math

import pytest
import torch

from evaluation.perplexity import perplexity, sliding_windows, to_perplexity, token_nll
from models.removal import removed_blocks


@pytest.mark.parametrize("n, max_length, stride", [(100, 16, 8), (100, 16, 5), (37, 10, 3), (64, 16, 16)])
def test_windows_score_each_token_once(n, max_length, stride):
    windows = sliding_windows(n, max_length, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert all(w.end - w.begin <= max_length and w.first_target > w.begin for w in windows)
    if stride < max_length:
        assert scored == list(range(1, n))  # every token but the stream's first, once, in order
    else:
        # windows do not overlap, so each window's first token has no context and is skipped
        assert scored == [t for t in range(n) if t % max_length != 0]


def reference_nll(model, ids, max_length, stride):
    """The transformers perplexity guide's loop, using the model's own loss."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        window = ids[begin:end].unsqueeze(0)
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        valid = (labels[:, 1:] != -100).sum().item()
        nll_sum += loss.double().item() * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    return nll_sum, n_tokens


@pytest.fixture
def ids(tokenizer, text):
    return torch.tensor(tokenizer(text)["input_ids"][:1500])


@pytest.mark.parametrize("max_length, stride", [(128, 64), (128, 128), (100, 37)])
def test_perplexity_matches_the_guide_loop(model, ids, max_length, stride):
    ours = perplexity(model, ids, max_length, stride, progress=False)
    nll, tokens = reference_nll(model, ids, max_length, stride)
    assert ours.tokens == tokens
    assert ours.nll_sum == pytest.approx(nll, rel=1e-6)
    assert ours.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-6)


def test_perplexity_matches_a_token_by_token_computation(model, ids):
    """Each token's NLL given all its context inside the window, computed by hand."""
    ids = ids[:300]
    max_length, stride = 64, 16
    total = 0.0
    for w in sliding_windows(len(ids), max_length, stride):
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[w.begin:w.end].unsqueeze(0)).logits[0].double(), -1)
        for t in range(w.first_target, w.end):
            total -= logp[t - 1 - w.begin, ids[t]].item()
    ours = perplexity(model, ids, max_length, stride, progress=False)
    assert ours.tokens == len(ids) - 1
    assert ours.perplexity == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-6)


def test_batching_does_not_change_the_result(model, ids):
    one = perplexity(model, ids, 96, 32, batch_size=1, progress=False)
    many = perplexity(model, ids, 96, 32, batch_size=7, progress=False)
    assert many.tokens == one.tokens
    assert many.perplexity == pytest.approx(one.perplexity, rel=1e-6)


def test_identity_block_removal_keeps_perplexity_to_the_last_bit(model, ids):
    base = perplexity(model, ids, 128, 64, progress=False).perplexity
    for block in range(4):
        with removed_blocks(model, [block]) as pruned:
            value = perplexity(pruned, ids, 128, 64, progress=False).perplexity
        assert (value == base) == (block == 2), f"block {block}: {value} vs {base}"


def test_overflowing_perplexity_is_inf_not_a_crash(model, ids):
    assert to_perplexity(1e6, 10) == math.inf
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e4)  # absurd logits: mean NLL far beyond exp's range
    assert perplexity(model, ids[:200], 64, 32, progress=False).perplexity == math.inf


@pytest.mark.parametrize("vocab_slice", [1, 7, 64, 100_000])
@pytest.mark.parametrize("bias", [False, True])
def test_slicing_the_vocabulary_gives_the_full_softmax_loss(vocab_slice, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 100, bias=bias)
    hidden, targets = torch.randn(30, 16) * 3, torch.randint(0, 100, (30,))
    full = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    sliced = token_nll(head, hidden, targets, vocab_slice)
    torch.testing.assert_close(sliced, full, rtol=1e-6, atol=1e-6)
