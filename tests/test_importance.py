"""Choosing blocks by importance scores and by search, and comparing the rules.

A random model's blocks are noise, and removing noise can lower perplexity,
so these tests train the tiny model briefly: afterwards removing any real
block hurts, while the identity block (its output projections zeroed and
frozen) still adds exactly nothing. Every rule must then remove it first.
"""

import json
import math
import re

import pandas as pd
import pytest
import torch

import main
from conftest import IDENTITY_BLOCK, N_LAYER, kit, quick, results_of
from evaluation.perplexity import perplexity
from pruning import calibration
from models.removal import removed_blocks
from pruning.compare import spearman
from config import DataSpec, RunConfig, SelectSpec
from pruning.calibration import Calibration, calibration_ids, one_pass_scores
from pruning.granularity import granularity_sets
from pruning.rules import RULES
from pruning.search import beam, greedy
from tiny import make_model, save_model_dir, train_briefly

FAST = quick(1000, "--calib-tokens", "1000")


@pytest.fixture(scope="module")
def ids(tokenizer, text):
    return torch.tensor(tokenizer(text)["input_ids"])


@pytest.fixture(scope="module")
def trained(tokenizer, ids):
    model = make_model(n_layer=N_LAYER, vocab_size=len(tokenizer), identity=(IDENTITY_BLOCK,))
    train_briefly(model, ids, identity=(IDENTITY_BLOCK,))
    return model


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, trained, tokenizer):
    return save_model_dir(tmp_path_factory.mktemp("trained"), trained, tokenizer)


def test_a_local_file_calibrates_on_tokens_after_the_evaluated_ones(tokenizer, text_file, ids, caplog):
    data = DataSpec(dataset=str(text_file), max_tokens=1000)
    assert torch.equal(calibration_ids(data, 3000, tokenizer), ids[1000:4000])
    assert "WARNING" not in caplog.text
    data = DataSpec(dataset=str(text_file), max_tokens=len(ids) - 100)  # too few left: calibrate on the evaluated
    assert torch.equal(calibration_ids(data, 3000, tokenizer), ids[:3000])  # ones, and say so
    assert "chosen on the tokens they are judged on" in caplog.text


def test_identity_block_has_zero_block_influence_and_angular_distance(model, ids):
    scores = one_pass_scores(model, ids[:1000], max_length=128)
    bi = scores.bi()
    assert bi[IDENTITY_BLOCK] == pytest.approx(0.0, abs=1e-12)
    assert all(s > 1e-4 for i, s in enumerate(bi) if i != IDENTITY_BLOCK)
    single_spans = scores.angular(1)
    assert single_spans[(IDENTITY_BLOCK,)] == pytest.approx(0.0, abs=1e-6)
    # a span's distance is measured end to end: spanning the identity block adds nothing to its neighbour
    two = scores.angular(2)
    assert two[(IDENTITY_BLOCK, IDENTITY_BLOCK + 1)] == pytest.approx(single_spans[(IDENTITY_BLOCK + 1,)])
    assert scores.tokens == 1000


@pytest.mark.parametrize("mode", [["importance", "--metric", "bi"], ["importance", "--metric", "angular"],
                                  ["importance", "--metric", "ppl"], ["greedy"], ["beam", "--beam-width", "2"]])
def test_every_rule_removes_the_identity_block_first(trained_dir, text_file, tmp_path, mode):
    assert kit(trained_dir, text_file, *FAST, "--mode", *mode, "--num-remove", "1", out=tmp_path) == 0
    rows = results_of(tmp_path)
    assert json.loads(rows.removed_layers[1]) == [IDENTITY_BLOCK]
    assert rows.perplexity[1] == rows.perplexity[0]  # removing an identity block changes nothing
    assert pd.isna(rows.metric[0]) and pd.isna(rows.scores[0])  # the baseline was not chosen by a rule
    assert rows.metric[1] == (mode[2] if mode[0] == "importance" else mode[0])
    scores = json.loads(rows.scores[1])
    assert set(scores) == {f"[{i}]" for i in range(N_LAYER)}  # every single block was a candidate
    assert min(scores, key=scores.get) == f"[{IDENTITY_BLOCK}]"
    if mode[-1] == "bi":
        assert scores[f"[{IDENTITY_BLOCK}]"] == pytest.approx(0.0, abs=1e-12)


def test_greedy_writes_a_row_per_step_and_never_puts_a_block_back(trained_dir, text_file, tmp_path):
    assert kit(trained_dir, text_file, *FAST, "--mode", "greedy", "--num-remove", "3", out=tmp_path) == 0
    rows = results_of(tmp_path)
    steps = [json.loads(r) for r in rows.removed_layers[1:]]
    assert [len(s) for s in steps] == [1, 2, 3]
    assert set(steps[0]) < set(steps[1]) < set(steps[2])
    assert [len(json.loads(s)) for s in rows.scores[1:]] == [4, 3, 2]  # candidates left at each step


def test_one_greedy_step_equals_the_ppl_rule(trained, ids):
    settings = dict(max_length=128, stride=64, progress=False)
    calib_ids = ids[1000:2500]
    ppl_rule = Calibration(trained, lambda: calib_ids, **settings)
    search = Calibration(trained, lambda: calib_ids, **settings)
    (step,) = greedy(search.perplexities, N_LAYER, 1, progress=False)
    scores = RULES["ppl"].scores(ppl_rule, 1)
    assert step.removed == RULES["ppl"].select(scores, 1) == (IDENTITY_BLOCK,)
    assert step.candidates == scores


def test_beam_escapes_a_greedy_trap():
    """Block 0 is the best single removal, but the best pair is {1, 2}: greedy commits to 0, a beam does not."""
    cost = {(0,): 1.0, (1,): 2.0, (2,): 2.5, (3,): 9.0, (1, 2): 1.5}
    score = lambda sets: [cost.get(s, 5.0 + sum(u.block for u in s)) for s in sets]
    assert [s.removed for s in greedy(score, 4, 2, progress=False)] == [(0,), (0, 1)]
    assert [s.removed for s in beam(score, 4, 2, width=2, progress=False)] == [(0,), (1, 2)]
    assert beam(score, 4, 2, width=1, progress=False) == greedy(score, 4, 2, progress=False)


def test_spearman_uses_average_ranks_for_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): Pearson of the ranks
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def optimum_lines(out: str) -> dict[int, tuple[list[int], float]]:
    found = {}
    for k, removed, ppl in re.findall(r"^(\d+)\s+optimum\s+([\d, ]+?)\s+([\d,.]+)\s+0\.00\s+[\d,]+ sets on evaluation tokens$",
                                     out, re.M):
        found[int(k)] = ([int(i) for i in removed.split(",")], float(ppl.replace(",", "")))
    return found


def test_compare_optimum_is_the_best_row_of_the_combinatorial_sweep(trained_dir, text_file, tmp_path, capsys):
    assert kit(trained_dir, text_file, *FAST, "--mode", "compare", "--max-remove", "2", out=tmp_path / "cmp") == 0
    out = capsys.readouterr().out
    assert kit(trained_dir, text_file, *FAST, "--mode", "combinatorial", "--min-remove", "1", "--max-remove", "2", out=tmp_path / "comb") == 0
    sweep = results_of(tmp_path / "comb")
    sweep["k"] = sweep.removed_layers.map(lambda r: len(json.loads(r)))
    optimum = optimum_lines(out)
    assert sorted(optimum) == [1, 2]
    for k, (removed, ppl) in optimum.items():
        best = sweep[sweep.k == k].sort_values("perplexity").iloc[0]
        assert json.loads(best.removed_layers) == removed
        assert ppl == pytest.approx(best.perplexity, abs=0.005)
    assert optimum[1][0] == [IDENTITY_BLOCK]

    rows = results_of(tmp_path / "cmp")
    assert len(rows) == 1 + math.comb(N_LAYER, 1) + math.comb(N_LAYER, 2)  # every set once, no extras here
    ours = rows.set_index("removed_layers").perplexity
    assert ours.to_dict() == pytest.approx(sweep.set_index("removed_layers").perplexity.to_dict())
    k1 = rows[rows.removed_layers == f"[{IDENTITY_BLOCK}]"].iloc[0]
    assert set(k1.metric.split(",")) >= {"bi", "angular", "ppl", "greedy", "beam", "evolve", "exhaustive"}
    assert json.loads(k1.scores)["bi"] == pytest.approx(0.0, abs=1e-12)
    # removing the identity block costs nothing on any text, so the ppl rule finds the optimum for k = 1
    assert re.search(rf"^1\s+ppl\s+{IDENTITY_BLOCK}\s+[\d,.]+\s+\+0\.00\s+4 sets, ", out, re.M)
    # every gap is the rule's evaluation perplexity against the optimum's, both from the CSV
    exact = {tuple(json.loads(r)): p for r, p in zip(rows.removed_layers, rows.perplexity)}
    gaps = re.findall(r"^(\d+)\s+(bi|angular|ppl|greedy|beam|evolve|random|last)\s+([\d, ]+?)\s+[\d,.]+\s+"
                      r"([+-][\d,.]+)\s+\S.*$", out, re.M)
    assert len(gaps) == 2 * 8
    for k, rule, removed, gap in gaps:
        chosen = tuple(int(i) for i in removed.split(","))
        best = exact[tuple(optimum[int(k)][0])]
        assert float(gap) == pytest.approx((exact[chosen] - best) / best * 100, abs=0.005), (k, rule)
    assert re.search(r"^last\s+\d\s+[+\d,.]+\s+[+\d,.]+$", out, re.M)  # every rule is summarized
    assert "Spearman correlation" in out


def test_compare_without_exhaustive_search_still_ranks_the_rules(trained_dir, text_file, tmp_path, capsys):
    assert kit(trained_dir, text_file, *FAST, "--mode", "compare", "--max-remove", "2", "--max-configs", "5", out=tmp_path) == 0
    out = capsys.readouterr().out
    assert sorted(optimum_lines(out)) == [1]  # C(4, 2) = 6 > 5
    assert "No exhaustive optimum for k = 2" in out
    rows = results_of(tmp_path)
    assert (rows.num_removed == 2).sum() < math.comb(N_LAYER, 2)


@pytest.mark.parametrize("args, message", [
    (["--mode", "greedy", "--metric", "bi"], "--metric is only used by --mode importance"),
    (["--mode", "importance", "--beam-width", "2"], "--beam-width is only used by --mode beam or compare"),
    (["--mode", "importance", "--num-remove", "4"], "--num-remove must be between 1 and 3"),
    (["--mode", "compare", "--max-remove", "4"], "--max-remove must be between 1 and 3"),
    (["--mode", "importance", "--metric", "cosine"], "invalid choice: 'cosine'"),
    (["--mode", "compare", "--shard", "0/2"], "--mode compare chooses its blocks on calibration tokens"),
])
def test_bad_input_is_one_line_and_no_file(model_dir, text_file, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(kit(model_dir, text_file, *FAST, *args, out=tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_block_influence_is_one_minus_the_mean_cosine_across_each_block(model, ids):
    # 1025 tokens in windows of 128: the last window holds a single token, which counts too
    stream = ids[:1025]
    scores = one_pass_scores(model, stream, max_length=128)
    assert scores.tokens == 1025
    cos_sums = torch.zeros(N_LAYER - 1, dtype=torch.float64)
    with torch.no_grad():
        for begin in range(0, len(stream), 128):
            states = model(stream[begin : begin + 128].unsqueeze(0), output_hidden_states=True).hidden_states
            for i in range(N_LAYER - 1):  # the last hidden state has the final layer norm applied
                cos_sums[i] += torch.cosine_similarity(states[i][0].double(), states[i + 1][0].double(), dim=-1).sum()
    expected = 1.0 - cos_sums / len(stream)
    assert scores.bi()[: N_LAYER - 1] == pytest.approx(expected.tolist(), abs=1e-9)


def test_calibration_scores_a_step_in_one_pass_with_the_numbers_of_each_pruned_model(model, ids, monkeypatch):
    calib_ids = ids[:600]
    calib = Calibration(model, lambda: calib_ids, max_length=128, stride=64, progress=False)
    passes = []
    real = calibration.sweep_perplexities
    monkeypatch.setattr(calibration, "sweep_perplexities", lambda *a, **k: passes.append(a[2]) or real(*a, **k))
    sets = [(0,), (1, 2), (3,), (0,)]
    got = calib.perplexities(sets)
    assert passes == [[(0,), (1, 2), (3,)]]  # one pass, each distinct set once
    for removed, ppl in zip(sets, got):
        with removed_blocks(model, removed) as pruned:
            assert ppl == pytest.approx(perplexity(pruned, calib_ids, 128, 64, progress=False).perplexity, rel=1e-6)
    assert calib.perplexities([(3,)]) == [got[2]] and len(passes) == 1  # cached


def test_compare_at_several_budgets_takes_one_calibration_pass_for_both_granularities(trained, ids):
    calib = Calibration(trained, lambda: ids[1000:2000], max_length=128, stride=64, progress=False)
    config = RunConfig(mode="compare", select=SelectSpec(target_params="0.95,0.9"))
    plan = granularity_sets(config, calib)
    assert calib.cache.passes == 1  # bi and angular, at two budgets and both granularities
    assert {g for (_, g, _) in plan.chosen} == {"block", "sublayer"}
