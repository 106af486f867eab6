"""Searching at depth: evolve (EvoPress), races, what a search costs, compare's best found, and stability.

An 8-block model, briefly trained (so removing a real block hurts) with one
exact identity block, gives searches a space worth searching: C(8, 3) = 56
sets, few enough to check every answer against brute force.
"""

import copy
import json
import math
import re
from itertools import combinations

import pytest
import torch

from config import SelectSpec
from conftest import IDENTITY_BLOCK, N_LAYER, kit, only_csv, quick, results_of
from evaluation.perplexity import perplexity
from models.removal import removed_blocks
from models.units import Unit, canonical
from pruning.budget import Budget
from pruning.calibration import Calibration
from pruning.evolve import evolve
from pruning.picks import picks
from pruning.race import Ranker, plain, ranker
from pruning.search import SEARCHES, greedy, rule_picks
from pruning.stability import jaccard
from tiny import make_model, save_model_dir, train_briefly

FAST = quick(1000, "--calib-tokens", "1000")
DEEP = 8
DEEP_IDENTITY = 5


@pytest.fixture(scope="module")
def ids(tokenizer, text):
    return torch.tensor(tokenizer(text)["input_ids"])


@pytest.fixture(scope="module")
def deep(tokenizer, ids):
    model = make_model(n_layer=DEEP, vocab_size=len(tokenizer), identity=(DEEP_IDENTITY,), seed=1)
    return train_briefly(model, ids, steps=80, identity=(DEEP_IDENTITY,))


# Output scales of the blocks of ``clear``: removing a block that adds little to the stream costs little,
# so greedy's order is 5, 6, 3, with clear margins.
SCALES = (1.0, 1.0, 1.0, 0.3, 1.0, 0.0, 0.1, 1.0)


@pytest.fixture(scope="module")
def clear(deep):
    model = copy.deepcopy(deep)
    with torch.no_grad():
        for block, scale in zip(model.transformer.h, SCALES):
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.mul_(scale)
                proj.bias.mul_(scale)
    return model


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tokenizer, ids):
    model = make_model(n_layer=N_LAYER, vocab_size=len(tokenizer), identity=(IDENTITY_BLOCK,))
    train_briefly(model, ids, identity=(IDENTITY_BLOCK,))
    return save_model_dir(tmp_path_factory.mktemp("trained"), model, tokenizer)


def calibration(model, ids, n=1200, **kw):
    calib_ids = ids[1000 : 1000 + n]
    return Calibration(model, lambda: calib_ids, max_length=128, stride=64, progress=False, **kw)


def test_a_view_of_a_token_slice_scores_those_tokens_and_keeps_its_own_cache_entries(deep, ids):
    calib = calibration(deep, ids)
    half = calib.head(0.5)
    assert half.span == (0, 600) and len(half.ids) == 600 and half.tokens(0, 10**6).span == (0, 600)
    assert calib.tokens(0, 10**6).span is None  # the whole of it is the calibration itself
    (whole,), (part,) = calib.perplexities([(1,)]), half.perplexities([(1,)])
    with removed_blocks(deep, (1,)) as pruned:
        assert part == pytest.approx(perplexity(pruned, ids[1000:1600], 128, 64, progress=False).perplexity, rel=1e-6)
        assert whole == pytest.approx(perplexity(pruned, ids[1000:2200], 128, 64, progress=False).perplexity,
                                      rel=1e-6)
    assert part != whole and set(calib.cache.perplexity) == {(None, (1,)), ((0, 600), (1,))}
    second = calib.slices(2)[1]
    assert second.span == (600, 1200) and torch.equal(second.ids, ids[1600:2200])


@pytest.mark.parametrize("race", [False, True])
def test_a_search_reports_the_work_the_engine_does_for_it(deep, ids, race):
    """On a fresh cache every set a search asks for is new, so its own cost is what the engine counted."""
    calib = calibration(deep, ids)
    steps = greedy(None, DEEP, 3, progress=False, rank=ranker(calib, race))
    cost = SEARCHES["greedy"].cost(steps, 3)
    work = calib.cache.work()
    assert (cost.evaluations, cost.tokens, cost.block_evals) == (work.evaluations, work.tokens, work.block_evals)
    assert cost.block_evals > 0


def test_racing_greedy_makes_the_same_choice_at_under_60_percent_of_the_block_evaluations(clear, ids):
    plain_steps = greedy(None, DEEP, 3, progress=False, rank=ranker(calibration(clear, ids), False))
    raced_steps = greedy(None, DEEP, 3, progress=False, rank=ranker(calibration(clear, ids), True))
    assert [s.removed for s in raced_steps] == [s.removed for s in plain_steps] == [(5,), (5, 6), (3, 5, 6)]
    assert [s.score for s in raced_steps] == pytest.approx([s.score for s in plain_steps])  # on all tokens
    plain_cost, raced_cost = (SEARCHES["greedy"].cost(s, 3) for s in (plain_steps, raced_steps))
    # per step of 8 candidates, 8 sets on a quarter of the tokens, 2 on half, 1 on all: 4 of 8 sets' worth of
    # tokens; windows overlap less on a short slice, and sets scored apart share fewer prefixes, so a little more
    assert raced_cost.block_evals < 0.6 * plain_cost.block_evals
    assert raced_cost.tokens < 0.55 * plain_cost.tokens
    assert raced_steps[0].scored == 8 and len(raced_steps[0].candidates) == 1


def brute_force(calib, k):
    sets = [canonical(c) for c in combinations(range(DEEP), k)]
    scores = dict(zip(sets, calib.perplexities(sets)))
    return min(scores, key=scores.get), scores


@pytest.mark.parametrize("k", [2, 3])
def test_evolve_finds_the_exhaustive_optimum_on_calibration_and_never_loses_to_its_seeds(deep, ids, k):
    calib = calibration(deep, ids)
    select = SelectSpec(generations=12, offspring=8)
    found = picks("evolve", calib, select, k, only=[k])
    assert list(found) == [k]
    pick = found[k]
    best, scores = brute_force(calibration(deep, ids), k)
    assert pick.removal == best
    seeds = [*rule_picks(calib, k).values(), picks("greedy", calib, select, k)[k].removal]
    trail = [s.score for s in pick.trail]
    assert trail == sorted(trail, reverse=True)  # each generation keeps the better of parent and child
    assert trail[0] == min(scores[canonical(s)] for s in seeds)  # generation 0 is the best seed
    assert pick.step.score == pytest.approx(scores[best])
    again = picks("evolve", calibration(deep, ids), select, k, only=[k])[k]
    assert [s.removed for s in again.trail] == [s.removed for s in pick.trail]  # repeatable for a seed


def test_evolve_keeps_a_seed_nothing_beats_and_leaves_a_trap_a_greedy_step_falls_into():
    """Sets of 2 of 6 blocks. The seed {0, 1} is the best of all sets: evolve returns it. Seeded with a
    poor set instead, it finds {4, 5}, whose blocks score badly alone."""
    best = {(0, 1): 1.0, (4, 5): 0.5}
    score = lambda sets: [best.get(tuple(u.block for u in s), 3.0 + sum(u.block for u in s) / 10) for s in sets]
    units = [Unit(i) for i in range(6)]
    gens = evolve(plain(score), units, 6, 2, [(0, 1)], generations=5, offspring=30, seed=0,
                  allowed=lambda s: s != (4, 5))
    assert all(g.best == (0, 1) for g in gens)
    gens = evolve(plain(score), units, 6, 2, [(2, 3)], generations=10, offspring=30, seed=0)
    assert gens[-1].best == (4, 5) and gens[-1].score == 0.5


def test_evolve_mode_writes_each_generations_best_and_records_its_cost(trained_dir, text_file, tmp_path, capsys):
    assert kit(trained_dir, text_file, *FAST, "--mode", "evolve", "--num-remove", "2", "--generations", "4",
               "--offspring", "4", "--seed", "3", out=tmp_path) == 0
    out = capsys.readouterr().out
    rows = results_of(tmp_path)
    chosen = [json.loads(r) for r in rows.removed_layers[1:]]
    assert all(len(c) == 2 for c in chosen) and len(set(map(tuple, chosen))) == len(chosen)
    assert set(rows.metric[1:]) == {"evolve"}
    assert "generation 0" in out and "4 generations of 4 offspring" in out
    sidecar = json.loads(only_csv(tmp_path).with_suffix(".json").read_text())
    info = sidecar["choosing"]
    cost = info["choosers"]["evolve"]["cost"]["2"]
    assert cost["block_evals"] > 0 and cost["tokens"] > 0 and "race" in info["choosers"]["evolve"]["ranking"]
    assert info["calibration_work"]["block_evals"] > 0


def test_evolve_under_a_budget_searches_at_greedys_size_and_meets_it(deep, ids):
    calib = calibration(deep, ids)
    select = SelectSpec(target_params="0.8", generations=4, offspring=6)
    budget = Budget(calib, select)
    greedy_k = max(picks("greedy", calib, select, DEEP - 1, stop=budget.met))
    found = picks("evolve", calib, select, DEEP - 1, stop=budget.met)
    assert list(found) == [greedy_k] and budget.met(found[greedy_k].removal)


def test_greedy_races_from_the_command_line(trained_dir, text_file, tmp_path, capsys):
    assert kit(trained_dir, text_file, *FAST, "--mode", "greedy", "--num-remove", "1", "--race", out=tmp_path) == 0
    assert json.loads(results_of(tmp_path).removed_layers[1]) == [IDENTITY_BLOCK]
    assert "race: every candidate on the first 0.25" in capsys.readouterr().out


def test_compare_past_max_configs_measures_against_the_best_set_found(trained_dir, text_file, tmp_path, capsys):
    assert kit(trained_dir, text_file, *FAST, "--mode", "compare", "--max-remove", "2", "--max-configs", "5",
               "--generations", "3", "--offspring", "4", out=tmp_path) == 0
    out = capsys.readouterr().out
    rows = results_of(tmp_path)
    ppl = {tuple(json.loads(r)): p for r, p in zip(rows.removed_layers, rows.perplexity)}
    line = re.search(r"^2\s+best found\s+(\d), (\d)\s+([\d,.]+)\s+0\.00\s+(greedy|beam|evolve): \d+ sets", out, re.M)
    assert line and not re.search(r"^2\s+optimum", out, re.M)
    searched = [tuple(int(i) for i in m.split(", ")) for m in
                re.findall(r"^2\s+(?:greedy|beam|evolve)\s+(\d, \d)\s", out, re.M)]
    assert len(searched) == 3
    assert (int(line[1]), int(line[2])) == min(searched, key=ppl.get)
    assert "Mean gap to best found" in out


def test_jaccard_counts_a_whole_block_as_its_two_sublayers():
    assert jaccard((1, 2), (2, 3)) == pytest.approx(2 / 6)
    assert jaccard((1,), canonical(["attn1"])) == pytest.approx(1 / 2)
    assert jaccard((4,), (4,)) == 1.0


def test_stability_names_the_identity_block_on_every_slice(model_dir, text_file, tmp_path, capsys):
    assert kit(model_dir, text_file, *quick(600, "--calib-tokens", "1500"), "--mode", "compare", "--max-remove", "1",
               "--calib-slices", "3", "--generations", "2", "--offspring", "2", out=tmp_path) == 0
    out = capsys.readouterr().out
    assert "3 disjoint slices of the 1,500 calibration tokens" in out
    for rule in ("bi", "angular"):
        assert re.search(rf"^{rule}\s+1\s+{IDENTITY_BLOCK}; {IDENTITY_BLOCK}; {IDENTITY_BLOCK}\s+1\.00\s+"
                         rf"[\d.,]+-[\d.,]+\s+0\.00$", out, re.M), rule
    sidecar = json.loads(only_csv(tmp_path).with_suffix(".json").read_text())
    info = sidecar["choosing"]
    held = {(h["name"], h["k"]): h for h in info["stability"]}
    assert held[("bi", 1)]["picks"] == [str(IDENTITY_BLOCK)] * 3 and held[("bi", 1)]["mean_jaccard"] == 1.0
    assert {name for name, _ in held} == {"bi", "angular", "ppl", "greedy", "beam", "evolve"}
    for h in held.values():  # each pick's perplexity is on all calibration tokens: one value per distinct pick
        by_pick = dict(zip(h["picks"], h["perplexities"]))
        assert len(by_pick) == len(set(h["picks"]))
        assert h["spread_pct"] == pytest.approx((max(h["perplexities"]) - min(h["perplexities"]))
                                                / min(h["perplexities"]) * 100)


def test_a_choosing_mode_reports_its_stability_too(model_dir, text_file, tmp_path, capsys):
    assert kit(model_dir, text_file, *quick(600, "--calib-tokens", "1200"), "--mode", "importance", "--metric", "bi",
               "--num-remove", "1", "--calib-slices", "2") == 0
    out = capsys.readouterr().out
    assert re.search(rf"^bi\s+1\s+{IDENTITY_BLOCK}; {IDENTITY_BLOCK}\s+1\.00\s", out, re.M)


def test_too_many_slices_is_one_clear_error(model_dir, text_file, capsys):
    assert kit(model_dir, text_file, *quick(300, "--calib-tokens", "10"), "--mode", "greedy", "--num-remove", "1",
               "--calib-slices", "6") == 2
    assert "--calib-slices 6 leaves 1 tokens a slice" in capsys.readouterr().err


def test_slices_with_compares_budgets_is_refused(model_dir, text_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        kit(model_dir, text_file, *quick(300), "--mode", "compare", "--target-params", "0.9", "--calib-slices", "2")
    assert exit_info.value.code == 2 and "--calib-slices reports the stability" in capsys.readouterr().err
