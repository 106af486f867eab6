"""Removing attention and MLP sublayers, not only whole blocks (--unit, --remove 2,attn4,mlp5).

The tiny models here have an exact identity attention or MLP (its output
projection zeroed): removing it must change nothing to the last bit, and
every rule must pick it first when sublayers are the candidates.
"""

import itertools
import json
import re

import pandas as pd
import pytest
import torch

import main
from evaluation.engine import sweep_perplexities
from evaluation.params import count_parameters, kv_cache_bytes_per_token
from evaluation.perplexity import perplexity
from models.families import FAMILIES as REGISTRY
from models.families import family_of, get_blocks, module_at
from models.removal import SkippedAttention, SkippedMLP, removed_blocks, removed_units, skipped_sublayer
from models.units import candidate_units, canonical, kept_nodes, parse_unit, removal_key, row_removal, validate_removal
from pruning.budget import parse_params_target
from pruning.calibration import Calibration
from pruning.rules import RULES, choose
from pruning.search import beam, greedy
from test_families import N_LAYER, build
from conftest import kit, quick, results_of
from tiny import make_model, make_text, save_model_dir, train_briefly
from utils.errors import KitError

IDENTITY_ATTN, IDENTITY_MLP = 1, 3
FAST = quick(600, "--calib-tokens", "600", "--max-length", "64", "--stride", "32")


@torch.no_grad()
def zero_output(model, index: int, sublayer: str) -> None:
    """Make block ``index``'s attention or MLP add exactly nothing: its output projection (weight, bias) zeroed."""
    family = family_of(model)
    proj = module_at(get_blocks(model)[index], family.attention_out if sublayer == "attn" else family.mlp_out)
    proj.weight.zero_()
    if proj.bias is not None:
        proj.bias.zero_()
    proj.requires_grad_(False)  # stays an identity through training


@pytest.fixture(scope="module")
def ids(tokenizer, text):
    return torch.tensor(tokenizer(text)["input_ids"])


@pytest.fixture(scope="module")
def long_ids(ids):
    return ids[:80]


@pytest.fixture(scope="module")
def trained(tokenizer, ids):
    """Briefly trained (so removing a real sublayer hurts), with attn1 and mlp3 exact identities."""
    model = make_model(n_layer=4, vocab_size=len(tokenizer))
    zero_output(model, IDENTITY_ATTN, "attn")
    zero_output(model, IDENTITY_MLP, "mlp")
    return train_briefly(model, ids, steps=150)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, trained, tokenizer):
    return save_model_dir(tmp_path_factory.mktemp("trained-units"), trained, tokenizer)


def test_units_parse_merge_and_refuse():
    assert [parse_unit(t) for t in ("3", "block3", "attn4", "mlp5")] == [3, 3, "attn4", "mlp5"]
    assert canonical(["mlp5", 2, "attn4", "attn5"]) == (2, "attn4", 5)  # attn5 + mlp5 is block 5
    assert validate_removal([1, 3], 4) == (1, 3)  # whole-block sets are the tuples they always were
    assert kept_nodes(4, (0, "attn2", "mlp3")) == ((1, "block"), (2, "mlp"), (3, "attn"))
    assert candidate_units("sublayer", 2) == ["attn0", "mlp0", "attn1", "mlp1"]
    assert removal_key((1, 3)) == "[1, 3]" and removal_key((1, "attn3")) == '["block1", "attn3"]'
    assert row_removal({"removed_layers": [2], "removed_units": ["block2", "attn3"]}) == (2, "attn3")
    assert row_removal({"removed_layers": [0, 2]}) == (0, 2)  # a file from before removed_units
    for bad, message in ((["attn2", 2], "part of block 2"), (["attn9"], "out of range"),
                         (["attn0", "attn1", "attn2", "attn3"], "every attention"), (["mlp1", "mlp1"], "more than once")):
        with pytest.raises(KitError, match=message):
            validate_removal(bad, 4)


@pytest.mark.parametrize("family", sorted(REGISTRY))
def test_removing_attn_and_mlp_of_a_block_equals_removing_the_block(family, tokenizer, long_ids):
    """Both sublayers skipped (not merged into a block removal) give the block's removal, to the last bit."""
    model = build(family, len(tokenizer))
    inputs = long_ids[None, :24]
    with torch.no_grad():
        with removed_blocks(model, [1]) as pruned:
            expected = pruned(inputs).logits
        block = get_blocks(model)[1]
        with skipped_sublayer(model, block, "attn"), skipped_sublayer(model, block, "mlp"):
            assert torch.equal(model(inputs).logits, expected)


# Sublayer sets that keep every real attention on a KV-cache layer of its own kind, in the models that mix
# kinds: Qwen full, full, sliding, sliding; Gemma 2 sliding, full, sliding, full; Gemma 3 sliding, sliding,
# full, sliding. Removing attn0 would shift the kinds in each of them.
MIXED_KINDS = {"qwen2": ["attn2", "mlp0"], "qwen3": ["attn2", "mlp0"], "gemma2": ["attn3", "mlp0"],
               "gemma3_text": ["attn3", "mlp1"]}


def decode(model, inputs, use_cache: bool):
    return model.generate(inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                          pad_token_id=0)


@pytest.mark.parametrize("family", sorted(REGISTRY))
def test_sublayer_removal_generates_the_same_with_and_without_cache(family, tokenizer, long_ids):
    """A skipped attention writes no KV-cache entry; the real ones are renumbered onto cache layers
    0, 1, ... A model whose attention kinds would then land on other cache kinds is refused."""
    model = build(family, len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = long_ids[None, :20]
    removal = MIXED_KINDS.get(family, ["attn0", "mlp2"])
    with removed_units(model, removal) as pruned, torch.no_grad():
        full = pruned(inputs).logits
        out = pruned(inputs[:, :16], use_cache=True)
        steps = [out.logits]
        for t in range(16, 20):
            out = pruned(inputs[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        assert torch.equal(decode(pruned, inputs, True), decode(pruned, inputs, False))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    if family in MIXED_KINDS:
        with pytest.raises(KitError, match="attention kind"), removed_units(model, ["attn0"]):
            pass


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_engine_equals_one_model_at_a_time_over_units(family, batch_size, tokenizer, long_ids):
    model = build(family, len(tokenizer))
    removals = [(), ("attn0",), ("mlp3",), (0, "mlp1"), ("attn1", "attn2"), ("mlp0", "attn3"), (2,), ("attn2",)]
    shared, work = sweep_perplexities(model, long_ids, removals, 32, 16, batch_size, progress=False)
    for removed, result in zip(removals, shared):
        with removed_units(model, removed) as pruned:
            alone = perplexity(pruned, long_ids, 32, 16, batch_size, progress=False)
        assert result == alone, (family, removed)
    assert work.block_evals < work.naive_block_evals  # the units' lists still share their prefixes


def test_an_identity_sublayer_is_removed_first_by_every_rule_and_changes_nothing(trained, ids):
    identities = {(f"attn{IDENTITY_ATTN}",), (f"mlp{IDENTITY_MLP}",)}
    calib = Calibration(trained, lambda: ids[:1200], 64, 32, progress=False, unit="sublayer")
    for name, rule in RULES.items():  # both score exactly "no change"; rounding may order them either way
        chosen, _ = choose(rule, calib, 1)
        assert chosen in identities, name
        assert set(choose(rule, calib, 2)[0]) == {u for (u,) in identities} or name == "angular", name
    assert greedy(calib.perplexities, N_LAYER, 2, progress=False, units=calib.units)[1].removed == (
        f"attn{IDENTITY_ATTN}", f"mlp{IDENTITY_MLP}")
    assert beam(calib.perplexities, N_LAYER, 1, 3, progress=False, units=calib.units)[0].removed == (
        f"attn{IDENTITY_ATTN}",)
    for unit, kind in ((f"attn{IDENTITY_ATTN}", "attn"), (f"mlp{IDENTITY_MLP}", "mlp")):
        one_kind = Calibration(trained, lambda: ids[:1200], 64, 32, progress=False, unit=kind)
        for name in ("bi", "ppl"):
            assert choose(RULES[name], one_kind, 1)[0] == (unit,), (name, kind)
    base = perplexity(trained, ids[:600], 64, 32, progress=False)
    with removed_units(trained, [f"attn{IDENTITY_ATTN}", f"mlp{IDENTITY_MLP}"]) as pruned:
        assert perplexity(pruned, ids[:600], 64, 32, progress=False) == base


def test_params_and_kv_cache_fall_with_the_units_removed(model):
    """Parameters counted on the pruned model (GPT-2's tied embedding once); an attention is a third of a
    GPT-2 block's parameters and all of its KV cache."""
    block = get_blocks(model)[0]
    attn = sum(p.numel() for p in block.attn.parameters())
    mlp = sum(p.numel() for p in block.mlp.parameters())
    full, kv = count_parameters(model), kv_cache_bytes_per_token(model)
    assert kv == 2 * 32 * 4 * N_LAYER  # 2 (K, V) x 32 width x 4 bytes x 4 attentions
    with removed_units(model, ["attn1"]) as pruned:
        assert count_parameters(pruned) == full - attn
        assert kv_cache_bytes_per_token(pruned) == kv * 3 // 4
    with removed_units(model, ["mlp1", "mlp2"]) as pruned:
        assert count_parameters(pruned) == full - 2 * mlp
        assert kv_cache_bytes_per_token(pruned) == kv
    assert abs(attn / (attn + mlp) - 1 / 3) < 0.01


def test_custom_mode_takes_units_and_the_csv_lists_them(trained_dir, text_file, tmp_path):
    assert kit(trained_dir, text_file, *FAST, "--mode", "custom", "--remove", "2,attn1,mlp3", out=tmp_path) == 0
    rows = results_of(tmp_path)
    first = list(rows.columns).index("removed_units")
    assert list(rows.columns[first : first + 4]) == ["removed_units", "kv_cache_bytes_per_token", "target", "patch"]
    base, pruned = rows.iloc[0], rows.iloc[1]
    assert json.loads(pruned.removed_units) == ["attn1", "block2", "mlp3"]
    assert json.loads(pruned.removed_layers) == [2]  # the whole blocks only, as scripts expect
    assert json.loads(base.removed_units) == []
    assert pruned.kv_cache_bytes_per_token == base.kv_cache_bytes_per_token // 2  # attentions 1 and 2 gone
    assert pruned.num_layers == 3


def test_sequential_over_sublayers_has_a_row_per_unit(trained_dir, text_file, tmp_path):
    assert kit(trained_dir, text_file, *FAST, "--mode", "sequential", "--unit", "sublayer", out=tmp_path) == 0
    rows = results_of(tmp_path)
    units = [tuple(json.loads(u)) for u in rows.removed_units]
    assert units == [(), *((u,) for u in candidate_units("sublayer", N_LAYER))]
    by_unit = dict(zip(units, rows.perplexity))
    assert by_unit[(f"attn{IDENTITY_ATTN}",)] == by_unit[()] == by_unit[(f"mlp{IDENTITY_MLP}",)]
    assert main.main(["--mode", "report", "--input", str(next(tmp_path.glob("*.csv")))]) == 0
    assert list(tmp_path.glob("*_per-unit.png")) and list(tmp_path.glob("*_report.md"))


def test_greedy_over_units_and_resume_of_unit_rows(trained_dir, text_file, tmp_path):
    assert kit(trained_dir, text_file, *FAST, "--mode", "greedy", "--unit", "sublayer", "--num-remove", "2", out=tmp_path) == 0
    rows = results_of(tmp_path)
    assert [json.loads(u) for u in rows.removed_units] == [[], ["attn1"], ["attn1", "mlp3"]]
    (path,) = tmp_path.glob("*.csv")
    assert main.main(["--model", str(trained_dir), "--dataset", str(text_file), *FAST, "--mode", "greedy",
                      "--unit", "sublayer", "--num-remove", "2", "--resume", str(path)]) == 0
    assert len(pd.read_csv(path)) == 3  # every configuration was already there


def test_unit_options_are_checked_before_any_work(trained_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    for args, message in ((["--mode", "custom", "--remove", "2,atn1"], "units such as"),
                          (["--mode", "baseline", "--unit", "attn"], "--unit is only used by")):
        with pytest.raises(SystemExit):
            kit(trained_dir, text_file, *FAST, *args, out=out)
        assert message in capsys.readouterr().err
    for args, message in ((["--mode", "custom", "--remove", "2,attn9"], "out of range"),
                          (["--mode", "importance", "--unit", "attn", "--metric", "angular", "--num-remove", "1"],
                           "angular")):
        assert kit(trained_dir, text_file, *FAST, *args, out=out) == 2
        assert message in capsys.readouterr().err
    assert not list(out.glob("*.csv")) if out.exists() else True


def test_a_params_target_is_a_fraction_or_a_count():
    assert parse_params_target("0.8") == 0.8
    assert parse_params_target("60M") == 60e6 and parse_params_target("1.5B") == 1.5e9
    assert parse_params_target("60000000") == 60e6
    for bad in ("0", "1.5", "-0.2", "60X", "eighty"):
        with pytest.raises(KitError, match="--target-params"):
            parse_params_target(bad)


@pytest.mark.parametrize("mode", ["greedy", "importance"])
def test_a_params_budget_removes_units_until_it_is_met(mode, trained_dir, text_file, tmp_path):
    """Rows record the target; the last set meets it, and (greedy's rows are its steps) the one before does not."""
    assert kit(trained_dir, text_file, *FAST, "--mode", mode, "--unit", "sublayer", "--target-params", "0.93", out=tmp_path) == 0
    rows = results_of(tmp_path)
    limit = 0.93 * rows.params.iloc[0]
    assert rows.params.iloc[-1] <= limit
    assert rows.target.iloc[-1] == "params<=0.93" and pd.isna(rows.target.iloc[0])
    if mode == "greedy":
        assert (rows.params.iloc[:-1] > limit).all()


def test_a_speedup_budget_stops_at_the_first_set_fast_enough(trained, ids, monkeypatch):
    """Under a controlled clock (prefill time = the sublayers that still run), greedy stops at 8/6 = 1.33x."""
    from config import SelectSpec
    from pruning import budget

    def clock(model, tokens):
        running = [b.attn for b in get_blocks(model)] + [b.mlp for b in get_blocks(model)]
        return float(sum(not isinstance(m, (SkippedAttention, SkippedMLP)) for m in running))

    monkeypatch.setattr(budget, "_prefill_ms", clock)
    calib = Calibration(trained, lambda: ids[:1200], 64, 32, progress=False, unit="sublayer")
    check = budget.Budget(calib, SelectSpec(unit="sublayer", target_speedup=1.3))
    steps = greedy(calib.perplexities, N_LAYER, 7, progress=False, units=calib.units, stop=check.met)
    assert len(steps) == 2 and steps[-1].removed == (f"attn{IDENTITY_ATTN}", f"mlp{IDENTITY_MLP}")


def test_compare_puts_blocks_against_sublayers_at_equal_prefill_speed(trained_dir, text_file, tmp_path, capsys,
                                                                       monkeypatch):
    """Under a controlled clock (prefill time = the sublayers that still run, 8 unpruned), a 1.3x
    speed-up needs 2 sublayers gone: one whole block, or two sublayers; the exact identities attn1 and
    mlp3 make the best sublayer pair cost nothing."""
    from pruning import budget

    def clock(model, tokens):
        running = [b.attn for b in get_blocks(model)] + [b.mlp for b in get_blocks(model)]
        return float(sum(not isinstance(m, (SkippedAttention, SkippedMLP)) for m in running))

    monkeypatch.setattr(budget, "_prefill_ms", clock)
    assert kit(trained_dir, text_file, *FAST, "--mode", "compare", "--target-speedup", "1.3", out=tmp_path) == 0
    out = capsys.readouterr().out
    assert "Whole blocks against sublayers at equal prefill speed-up" in out
    rows = results_of(tmp_path)
    assert set(rows.target[1:]) == {"prefill speed-up>=1.3"}  # the baseline row has none
    chosen = [json.loads(u) for u in rows.removed_units[1:]]
    blocks = [u for u in chosen if all(x.startswith("block") for x in u)]
    assert blocks and all(len(u) == 1 for u in blocks)  # one block is 8/6 = 1.33x
    assert ["attn1", "mlp3"] in chosen
    best = re.search(r"At prefill speed-up>=1.3: best block set .*best sublayer set (\S+, \S+) \((\w+), PPL ([\d,.]+)\)",
                     out)
    assert best and best.group(1) == "attn1, mlp3"
    assert float(best.group(3).replace(",", "")) == pytest.approx(rows.perplexity.iloc[0], abs=0.005)


def test_compare_puts_blocks_against_sublayers_at_each_budget(trained_dir, text_file, tmp_path, capsys):
    assert kit(trained_dir, text_file, *FAST, "--mode", "compare", "--target-params", "0.9,0.8", out=tmp_path) == 0
    rows = results_of(tmp_path)
    out = capsys.readouterr().out
    assert "Whole blocks against sublayers at equal parameter budgets" in out
    for budget in ("0.9", "0.8"):
        assert f"At params<={budget}: best block set" in out
    base = rows.params.iloc[0]
    for metric, params in zip(rows.metric.iloc[1:], rows.params.iloc[1:]):  # each set meets its tightest budget
        tightest = min(float(role.split("@")[1]) for role in metric.split(","))
        assert params <= tightest * base
    (report,) = tmp_path.glob("*_report.md")
    assert "best sublayer set" in report.read_text()


def test_a_partial_block_export_loads_in_plain_transformers_with_the_same_logits(trained_dir, text_file, tmp_path,
                                                                               trained, ids):
    from transformers import AutoModelForCausalLM

    target = tmp_path / "pruned"
    assert kit(trained_dir, text_file, *FAST, "--mode", "custom", "--remove", "0,attn2,mlp3", "--save-model", str(target), out=tmp_path / "out") == 0
    report = json.loads((target / "pruning_report.json").read_text())
    assert report["removed_units"] == ["block0", "attn2", "mlp3"] and report["removed_blocks"] == [0]
    assert report["zeroed_sublayers"] == ["attn2", "mlp3"]
    assert "keeps their weights" in (target / "README.md").read_text().replace("\n", " ")
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert reloaded.config.n_layer == 3
    inputs = ids[None, :40]
    with removed_units(trained, [0, "attn2", "mlp3"]) as pruned, torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, pruned(inputs).logits)
        assert count_parameters(reloaded) > count_parameters(pruned)  # the zeroed sublayers' weights are kept


def test_a_sublayer_only_export_card_says_which_sublayers_went_and_that_every_block_stayed(trained_dir, text_file,
                                                                                          tmp_path):
    target = tmp_path / "attn-only"
    assert kit(trained_dir, text_file, *FAST, "--mode", "custom", "--remove", "attn2", "--no-speed", "--save-model", str(target), out=tmp_path / "out") == 0
    card = (target / "README.md").read_text()
    assert "with 1 sublayer removed" in card and "by removing attn2" in card and "all 4 blocks are kept" in card
    assert "depth-pruned" not in card and "removing transformer blocks" not in card


def test_a_healed_partial_block_export_keeps_its_sublayers_removed(trained_dir, text_file, tmp_path, ids):
    from transformers import AutoModelForCausalLM

    target = tmp_path / "healed"
    train = tmp_path / "train.txt"
    train.write_text(make_text(300, seed=5), encoding="utf-8")
    assert kit(trained_dir, text_file, *FAST, "--mode", "custom", "--remove", "0,attn2", "--heal-steps", "3", "--heal-seq-len", "32", "--train-dataset", str(train), "--save-model", str(target), out=tmp_path / "out") == 0
    report = json.loads((target / "pruning_report.json").read_text())
    assert report["zeroed_sublayers"] == ["attn2"] and report["healing"]["steps"] == 3
    assert "frozen at zero" in (target / "README.md").read_text().replace("\n", " ")
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    proj = reloaded.transformer.h[1].attn.c_proj  # original block 2 is block 1 once block 0 is gone
    assert not proj.weight.any() and not proj.bias.any()


def test_compare_judges_every_rule_against_the_exhaustive_optimum_over_sublayers(trained_dir, text_file, tmp_path,
                                                                                   capsys):
    """8 sublayer units, k = 1, 2: every 1- and 2-unit set is evaluated; attn1 and mlp3 are exact
    identities, so the optimum removes them at no cost, and each rule's gap is read off the CSV."""
    assert kit(trained_dir, text_file, *FAST, "--mode", "compare", "--unit", "sublayer", "--max-remove", "2", out=tmp_path) == 0
    out = capsys.readouterr().out
    rows = results_of(tmp_path)
    ppl = {canonical([parse_unit(x) for x in json.loads(u)]): p for u, p in zip(rows.removed_units, rows.perplexity)}
    base = ppl[()]
    units = candidate_units("sublayer", 4)
    pairs = {validate_removal(pair, 4) for pair in itertools.combinations(units, 2)}
    assert set(ppl) == {()} | {canonical([u]) for u in units} | pairs  # every set once, the rules' picks among them
    assert len(rows) == 1 + 8 + 28
    optimum = dict(re.findall(r"^(\d)\s+optimum\s+(\S+(?:, \S+)*)\s+[\d,.]+\s+0\.00\s+[\d,]+ sets on", out, re.M))
    assert optimum == {"1": f"attn{IDENTITY_ATTN}", "2": f"attn{IDENTITY_ATTN}, mlp{IDENTITY_MLP}"}
    assert ppl[("attn1", "mlp3")] == base and min(ppl[p] for p in pairs) == base
    gaps = re.findall(r"^(\d)\s+(bi|angular|ppl|greedy|beam|evolve|random|last)\s+(\S+(?:, \S+)*)\s+[\d,.]+\s+"
                      r"([+-][\d,.]+)\s+\S.*$", out, re.M)
    assert {rule for _, rule, _, _ in gaps} == {"bi", "angular", "ppl", "greedy", "beam", "evolve", "random", "last"}
    for k, rule, removed, gap in gaps:
        chosen = canonical([parse_unit(u) for u in removed.split(", ")])
        best = ppl[canonical([parse_unit(u) for u in optimum[k].split(", ")])]
        assert float(gap) == pytest.approx((ppl[chosen] - best) / best * 100, abs=0.005), (k, rule)
    assert "k counts sublayers" in out and "over 8 sublayer units" in out


def test_compare_up_to_one_unit_left_plans_only_sets_that_keep_an_attention(trained, ids):
    """At k = 7 of 8 sublayers, a rule's pick, the random draw or the last 7 units may leave an MLP alone:
    such a pick is left out of that k, not evaluated (the model would have no attention)."""
    from config import RunConfig, SelectSpec
    from pruning.compare import compare_sets

    calib = Calibration(trained, lambda: ids[:600], 64, 32, progress=False, unit="sublayer")
    plan = compare_sets(RunConfig(mode="compare", select=SelectSpec(unit="sublayer", max_configs=8)), calib)
    assert sorted(plan.chosen) == list(range(1, 8)) and sorted(plan.exhaustive) == [1, 7]
    for k, by_rule in plan.chosen.items():
        assert {"greedy", "beam", "evolve"} <= set(by_rule)
        for removal in by_rule.values():
            assert validate_removal(removal, 4) == removal and plan.size(removal) == k
    assert plan.chosen[7]["last"] == ("mlp0", 1, 2, 3)  # the last 7 of attn0, mlp0, attn1, ...: attn0 stays
    assert len(plan.chosen[7]) < 7  # some rule's 7 lowest-scored units held every attention: left out
    assert all(len(kept_nodes(4, s)) == 1 for s in plan.exhaustive[7])  # 4 sets, each keeping one attention
    assert len(plan.exhaustive[7]) == 4


def test_compare_over_attentions_leaves_out_angular(trained_dir, text_file, tmp_path, capsys):
    assert kit(trained_dir, text_file, *FAST, "--mode", "compare", "--unit", "attn", "--max-remove", "1", out=tmp_path) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^1\s+optimum\s+attn{IDENTITY_ATTN}\s", out, re.M)
    assert not re.search(r"^1\s+angular\s", out, re.M) and "Spearman correlation" in out


def test_combinatorial_and_random_draw_units(trained_dir, text_file, tmp_path):
    assert kit(trained_dir, text_file, *FAST, "--mode", "combinatorial", "--unit", "attn", "--min-remove", "1", "--max-remove", "2", out=tmp_path / "c") == 0
    units = [tuple(json.loads(u)) for u in results_of(tmp_path / "c").removed_units]
    assert len(units) == 1 + 4 + 6 and ("attn0", "attn3") in units
    assert kit(trained_dir, text_file, *FAST, "--mode", "random", "--unit", "mlp", "--num-remove", "2", out=tmp_path / "r") == 0
    (drawn,) = [json.loads(u) for u in results_of(tmp_path / "r").removed_units[1:]]
    assert len(drawn) == 2 and all(u.startswith("mlp") for u in drawn)


def test_shards_of_a_unit_sweep_merge_into_the_unsharded_rows(trained_dir, text_file, tmp_path):
    args = ["--mode", "sequential", "--unit", "sublayer"]
    assert kit(trained_dir, text_file, *FAST, *args, out=tmp_path / "whole") == 0
    for i in (0, 1):
        assert kit(trained_dir, text_file, *FAST, *args, "--shard", f"{i}/2", out=tmp_path / "shards") == 0
    assert main.main(["--mode", "merge", "--inputs", *map(str, sorted((tmp_path / "shards").glob("*.csv"))),
                      "--output-dir", str(tmp_path / "merged"), "--quiet"]) == 0
    whole, merged = results_of(tmp_path / "whole"), results_of(tmp_path / "merged")
    assert list(merged.removed_units) == list(whole.removed_units)
    assert list(merged.perplexity) == list(whole.perplexity)
