"""The shared-prefix sweep engine gives every configuration the perplexity of
evaluating its pruned model on its own, for less work; the token cache lets a
second run skip tokenization."""

import csv
import itertools
import json

import pytest
import torch

import main
from conftest import IDENTITY_BLOCK, N_LAYER
from evaluation.engine import Work, count_nodes, prefix_tree, sweep_perplexities
from evaluation.perplexity import perplexity, sliding_windows
from config import WindowSpec
from evaluation.sweep import EvalSettings, measure, measure_all
from models.removal import removed_blocks
from utils import cache

# Windows of 48 tokens every 20: overlapping, and a shorter last window.
MAX_LENGTH, STRIDE = 48, 20


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))



@pytest.fixture(scope="module")
def ids(tokenizer, text):
    return torch.tensor(tokenizer(text)["input_ids"][:160])


def reference(model, ids, removed, batch_size):
    with removed_blocks(model, removed) as pruned:
        return perplexity(pruned, ids, MAX_LENGTH, STRIDE, batch_size, progress=False)


def assert_matches_one_at_a_time(model, ids, removals, batch_size):
    results, _ = sweep_perplexities(model, ids, removals, MAX_LENGTH, STRIDE, batch_size, progress=False)
    for removed, got in zip(removals, results):
        want = reference(model, ids, removed, batch_size)
        assert got.tokens == want.tokens
        assert got.perplexity == pytest.approx(want.perplexity, rel=1e-6, abs=0), removed
    return results


def test_sequential_sweep_matches_each_pruned_model(model, ids):
    removals = [()] + [(i,) for i in range(N_LAYER)]
    results = assert_matches_one_at_a_time(model, ids, removals, batch_size=1)
    by_removal = dict(zip(removals, (r.perplexity for r in results)))
    # the identity block changes nothing; every other block changes something
    assert by_removal[(IDENTITY_BLOCK,)] == by_removal[()]
    assert all(by_removal[(i,)] != by_removal[()] for i in range(N_LAYER) if i != IDENTITY_BLOCK)


def test_combinatorial_sweep_matches_each_pruned_model_with_batched_windows(model, ids):
    removals = [c for k in range(1, N_LAYER) for c in itertools.combinations(range(N_LAYER), k)]
    assert_matches_one_at_a_time(model, ids, removals, batch_size=3)


def test_sequential_sweep_shares_the_baseline_chain(model, ids):
    removals = [()] + [(i,) for i in range(N_LAYER)]
    _, work = sweep_perplexities(model, ids, removals, MAX_LENGTH, STRIDE, progress=False)
    windows = len(sliding_windows(len(ids), MAX_LENGTH, STRIDE))
    # the chain of L blocks, then blocks i+1..L-1 after skipping block i
    assert work.block_evals == windows * (N_LAYER + N_LAYER * (N_LAYER - 1) // 2)
    assert work.naive_block_evals == windows * (N_LAYER + N_LAYER * (N_LAYER - 1))
    assert work.tokens_scored == len(removals) * (len(ids) - 1)
    assert work.windows == windows and work.configurations == len(removals)
    # model FLOPs by hand: 12 d^2 weights per block, 2 FLOPs per multiply-add, 4 d per causal query-key
    # pair (scores and weighted sum), and the d x vocab head on each scored token of each configuration
    d, vocab = model.config.n_embd, model.config.vocab_size
    block = sum(2 * 12 * d * d * w.length + 4 * d * w.length * (w.length + 1) // 2
                for w in sliding_windows(len(ids), MAX_LENGTH, STRIDE))
    head = 2 * d * vocab * (len(ids) - 1)
    assert work.flops == (N_LAYER + N_LAYER * (N_LAYER - 1) // 2) * block + len(removals) * head
    assert work.flops_per_s > 0


def test_prefix_tree_computes_each_distinct_prefix_once():
    kept = [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3), (0, 1)]
    # distinct prefixes: 0, 01, 012, 013, 02, 023, 1, 12, 123
    assert count_nodes(prefix_tree(kept)) == 9


def test_work_counts_add_up():
    total = Work()
    total.add(Work(configurations=2, block_evals=5, naive_block_evals=8, flops=10.0, seconds=2.0))
    total.add(Work(configurations=1, block_evals=3, naive_block_evals=3, flops=6.0, seconds=2.0))
    assert (total.configurations, total.block_evals, total.naive_block_evals) == (3, 8, 11)
    assert total.flops_per_s == 4.0
    assert total.as_dict()["block_evals_saved"] == pytest.approx(3 / 11)


def test_measurements_equal_one_model_at_a_time(model, ids):
    settings = EvalSettings(WindowSpec(MAX_LENGTH, STRIDE), progress=False)
    removals = [(1, 3), (0,)]
    shared = list(measure_all(model, ids, None, removals, settings))
    alone = [measure(model, ids, None, removed, settings) for removed in removals]
    assert [m.removed for m in alone] == [m.removed for m in shared] == removals
    for a, s in zip(alone, shared):
        assert a.ppl == s.ppl and a.params == s.params and a.num_layers == N_LAYER - len(a.removed)
    # one pass for the group, one per configuration one at a time
    assert [m.work is not None for m in shared] == [True, False]
    assert all(m.work.block_evals == m.work.naive_block_evals > 0 for m in alone)


def test_cli_sweep_logs_its_work_and_matches_the_reference(model_dir, text_file, tmp_path, capsys, model, ids):
    code = main.main(["--mode", "sequential", "--model", str(model_dir), "--dataset", str(text_file),
                      "--max-tokens", "160", "--max-length", str(MAX_LENGTH), "--stride", str(STRIDE),
                      "--no-speed", "--save_results", "--output-dir", str(tmp_path)])
    assert code == 0
    assert "block evaluations (one-at-a-time:" in capsys.readouterr().err
    [path] = tmp_path.glob("*.csv")
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == N_LAYER + 1
    # the baseline is evaluated in the sweep's own pass: its chain is every other row's prefix
    work = json.loads(path.with_suffix(".json").read_text())["work"]
    windows = len(sliding_windows(160, MAX_LENGTH, STRIDE))
    assert work["block_evals"] == windows * (N_LAYER + N_LAYER * (N_LAYER - 1) // 2)
    for row in rows:
        removed = tuple(int(i) for i in row["removed_layers"].strip("[]").split(",") if i.strip())
        assert float(row["perplexity"]) == pytest.approx(reference(model, ids, removed, 1).perplexity, rel=1e-6)


def test_token_cache_skips_tokenization_on_a_second_run(tokenizer, text, tmp_path, monkeypatch):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text(text, encoding="utf-8")
    calls = []
    real = cache.tokenize
    monkeypatch.setattr(cache, "tokenize", lambda tok, text: calls.append(1) or real(tok, text))
    first = cache.cached_token_ids(tokenizer, str(text_file), "test", "text", tmp_path)
    second = cache.cached_token_ids(tokenizer, str(text_file), "test", "text", tmp_path)
    assert torch.equal(first, second) and len(calls) == 1
    # new content, new key
    text_file.write_text(text_file.read_text() + " The end.", encoding="utf-8")
    third = cache.cached_token_ids(tokenizer, str(text_file), "test", "text", tmp_path)
    assert len(calls) == 2 and len(third) > len(first)


def test_token_cache_key_depends_on_tokenizer_and_dataset(tokenizer, text):
    from tiny import make_tokenizer

    other = make_tokenizer(text, vocab_size=300)
    assert cache.cache_key(tokenizer, "wikitext-2-raw-v1", "test", "text") != \
        cache.cache_key(other, "wikitext-2-raw-v1", "test", "text")
    assert cache.cache_key(tokenizer, "wikitext-2-raw-v1", "test", "text") != \
        cache.cache_key(tokenizer, "wikitext-2-raw-v1", "validation", "text")
    assert cache.default_cache_dir().name == "gpt2-pruning-kit"
