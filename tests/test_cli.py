"""The command line, driven as a user would drive it."""

import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

import main
from conftest import IDENTITY_BLOCK, N_LAYER, ROOT, kit, quick, results_of
from config import SelectSpec
from pruning.plans import removal_count
from reporting.csvfile import ResultsFile, read_rows, results_path
from reporting.schema import COLUMNS

FAST = quick(1500)


def test_sequential_writes_one_row_per_block_plus_baseline(model_dir, text_file, tmp_path, capsys):
    assert kit(model_dir, text_file, "--mode", "sequential", *FAST, out=tmp_path) == 0
    rows = results_of(tmp_path)
    removed = [json.loads(r) for r in rows.removed_layers]
    assert removed == [[]] + [[i] for i in range(N_LAYER)]
    base = rows.iloc[0]
    identity = rows.iloc[1 + IDENTITY_BLOCK]
    assert identity.perplexity == base.perplexity and identity.ppl_change_pct == 0.0
    others = rows.iloc[1:].drop(index=1 + IDENTITY_BLOCK)
    assert (others.perplexity != base.perplexity).all()
    block_params = base.params - rows.params.iloc[1]
    assert (rows.params.iloc[1:] == base.params - block_params).all()
    assert rows.ppl_change_pct.tolist() == pytest.approx(
        [(p - base.perplexity) / base.perplexity * 100 for p in rows.perplexity])
    assert rows.params_change_pct.tolist() == pytest.approx(
        [(p - base.params) / base.params * 100 for p in rows.params])
    assert (rows.num_layers == [N_LAYER] + [N_LAYER - 1] * N_LAYER).all()
    assert (rows.eval_tokens == 1499).all()
    assert rows.latency_ms.isna().all()  # --no-speed
    least = json.loads(rows.removed_layers[rows.perplexity.iloc[1:].idxmin()])[0]
    out = capsys.readouterr().out
    assert "Removed" in out and f"Least harmful: removing block {least} " in out


def test_combinatorial_runs_every_subset(model_dir, text_file, tmp_path):
    assert kit(model_dir, text_file, "--mode", "combinatorial", *FAST, out=tmp_path) == 0
    rows = results_of(tmp_path)
    assert len(rows) == 1 + math.comb(4, 2) + math.comb(4, 3)
    assert len(set(rows.removed_layers)) == len(rows)
    assert kit(model_dir, text_file, "--mode", "combinatorial", "--min-remove", "1", "--max-remove", "1", *FAST, out=tmp_path / "k1") == 0
    assert len(results_of(tmp_path / "k1")) == 1 + 4


def test_random_removes_ratio_of_blocks_chosen_by_seed(model_dir, text_file, tmp_path, capsys):
    assert kit(model_dir, text_file, "--mode", "random", "--seed", "3", *FAST, out=tmp_path) == 0
    rows = results_of(tmp_path)
    chosen = json.loads(rows.removed_layers.iloc[1])
    assert len(chosen) == 2 and rows.num_layers.iloc[1] == 2
    out = capsys.readouterr().out
    assert "Original Model" in out and "Pruned Model" in out
    assert kit(model_dir, text_file, "--mode", "random", "--seed", "3", *FAST, out=tmp_path / "again") == 0
    assert json.loads(results_of(tmp_path / "again").removed_layers.iloc[1]) == chosen
    assert kit(model_dir, text_file, "--mode", "random", "--num-remove", "3", *FAST, out=tmp_path / "three") == 0
    assert results_of(tmp_path / "three").num_layers.iloc[1] == 1


@pytest.mark.parametrize("ratio, depth, k", [(0.5, 3, 2), (0.5, 6, 3), (0.58, 25, 15), (0.7, 45, 32), (0.25, 12, 3)])
def test_ratio_rounds_half_up_exactly(ratio, depth, k):
    assert removal_count(SelectSpec(ratio=ratio), depth) == k


def test_speed_columns_are_filled_when_timed(model_dir, text_file, tmp_path):
    assert kit(model_dir, text_file, "--mode", "custom", "--remove", "0,1", "--max-tokens", "300", "--speed-runs", "3", "--speed-warmup", "1", "--gen-tokens", "8", out=tmp_path) == 0
    rows = results_of(tmp_path)
    assert (rows.latency_ms > 0).all() and (rows.prefill_ms > 0).all() and (rows.tokens_per_s > 0).all()
    # the pruned model's change is against the baseline runs interleaved with its own, not the baseline row's
    assert rows.speed_change_pct.iloc[1] == pytest.approx(
        (rows.latency_ms.iloc[1] - rows.baseline_latency_ms.iloc[1]) / rows.baseline_latency_ms.iloc[1] * 100)
    assert rows.speed_change_pct.iloc[0] == 0 and rows.baseline_latency_ms.isna().iloc[0]
    # three runs per model bound nothing: the change is within the noise
    assert rows.speed_change_low_pct.iloc[1] == -math.inf and rows.speed_change_high_pct.iloc[1] == math.inf


def test_custom_saves_a_pruned_model_that_reloads_and_scores_the_same(model_dir, text_file, tmp_path):
    saved = tmp_path / "pruned"
    assert kit(model_dir, text_file, "--mode", "custom", "--remove", "1,3", "--save-model", str(saved), *FAST, out=tmp_path / "a") == 0
    custom = results_of(tmp_path / "a").iloc[1]
    assert json.loads(custom.removed_layers) == [1, 3]
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert reloaded.config.n_layer == 2
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    out = reloaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                            pad_token_id=0)
    assert out.shape[1] == 10
    assert kit(saved, text_file, "--mode", "baseline", *FAST, out=tmp_path / "b") == 0
    assert results_of(tmp_path / "b").perplexity.iloc[0] == custom.perplexity


def test_resume_completes_an_interrupted_file(model_dir, text_file, tmp_path):
    assert kit(model_dir, text_file, "--mode", "sequential", *FAST, out=tmp_path) == 0
    full = next(tmp_path.glob("*.csv"))
    lines = full.read_text().splitlines()
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(lines[:3]) + "\n")  # header, baseline, block 0: as if killed mid-sweep
    assert kit(model_dir, text_file, "--mode", "sequential", "--resume", str(partial), *FAST) == 0
    resumed, complete = pd.read_csv(partial), pd.read_csv(full)
    assert resumed.removed_layers.tolist() == complete.removed_layers.tolist()
    assert resumed.perplexity.tolist() == complete.perplexity.tolist()
    # a file evaluated on other tokens cannot be continued: its rows would not be comparable
    assert kit(model_dir, text_file, "--mode", "sequential", "--resume", str(partial), "--no-speed", "--max-tokens", "1000") == 2
    assert pd.read_csv(partial).removed_layers.tolist() == complete.removed_layers.tolist()


def test_results_files_are_never_overwritten(model_dir, text_file, tmp_path):
    for _ in range(2):
        assert kit(model_dir, text_file, "--mode", "baseline", *FAST, out=tmp_path) == 0
    assert len(list(tmp_path.glob("*.csv"))) == 2


BAD_INPUTS = [
    (["--mode", "custom", "--remove", "4"], "out of range"),
    (["--mode", "custom", "--remove", "-1"], "negative"),
    (["--mode", "custom", "--remove", "1,1"], "more than once"),
    (["--mode", "custom", "--remove", "0,1,2,3"], "cannot remove all"),
    (["--mode", "custom", "--remove", "a,b"], "block indices"),
    (["--mode", "custom"], "needs --remove"),
    (["--mode", "random", "--ratio", "1.0"], "between 0 and 1"),
    (["--mode", "random", "--ratio", "0"], "between 0 and 1"),
    (["--mode", "random", "--ratio", "0.1"], "removes 0 of 4"),
    (["--mode", "random", "--num-remove", "4"], "between 1 and 3"),
    (["--mode", "combinatorial", "--max-remove", "4"], "less than the model's 4 blocks"),
    (["--mode", "combinatorial", "--min-remove", "3", "--max-remove", "2"], "smaller than --min-remove"),
    (["--mode", "shuffle"], "invalid choice"),
    (["--mode", "baseline", "--stride", "200", "--max-length", "100"], "larger than --max-length"),
    (["--mode", "baseline", "--stride", "0"], "must be positive"),
    (["--mode", "baseline", "--max-length", "4096"], "exceeds the model's context size"),
    (["--mode", "custom", "--remove", "1", "--heal-steps", "1", "--heal-lr=-1e-4"], "positive, finite"),
    (["--mode", "custom", "--remove", "1", "--heal-steps", "1", "--heal-lr", "nan"], "positive, finite"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_no_file(model_dir, text_file, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(kit(model_dir, text_file, *args, *FAST, out=tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not any(tmp_path.iterdir())


def bad_paths(tmp_path, model_dir, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    return [
        (["--model", str(tmp_path / "no-model"), "--dataset", str(text_file)], "does not exist"),
        (["--model", str(model_dir), "--dataset", str(tmp_path / "none.txt")], "does not exist"),
        (["--model", str(model_dir), "--dataset", str(empty)], "contains no text"),
        (["--model", str(model_dir), "--dataset", str(text_file), "--mode", "custom", "--remove", "1",
          "--save-model", str(occupied)], "not empty"),
    ]


def test_an_unreadable_dataset_file_is_named_before_any_model_loads(model_dir, tmp_path, capsys, monkeypatch):
    import runner.evaluate

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset was checked")

    monkeypatch.setattr(runner.evaluate, "load_model", no_loading)
    raw = tmp_path / "wiki.test.raw"  # WikiText's own file name: text, but not a suffix the kit reads
    raw.write_text("Some text.\n", encoding="utf-8")
    for args, message in [(["--dataset", str(raw)], "has an unknown type"),
                          (["--dataset", str(tmp_path / "none.txt")], "does not exist"),
                          (["--mode", "custom", "--remove", "1", "--dataset", str(raw.with_suffix(".txt")),
                            "--heal-steps", "1", "--train-dataset", str(tmp_path / "gone.txt")],
                           "--train-dataset file")]:
        raw.with_suffix(".txt").write_text("Some text.\n", encoding="utf-8")
        argv = ["--model", str(model_dir), *FAST, *args]
        assert main.main(argv if "--mode" in args else ["--mode", "baseline", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_bad_paths_are_one_line_errors(model_dir, text_file, tmp_path, capsys):
    out_dir = tmp_path / "out"
    for args, message in bad_paths(tmp_path, model_dir, text_file):
        argv = ["--mode", "baseline", *args, *FAST, "--save_results", "--output-dir", str(out_dir)]
        if "custom" in args:
            argv = argv[2:]  # the case brings its own --mode
        assert main.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not out_dir.exists()
    assert [p.name for p in (tmp_path / "occupied").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_offline_hub_model_and_dataset_say_how_to_work_locally(model_dir, text_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for args in (["--model", "distilgpt2", "--dataset", str(text_file)],
                 ["--model", str(model_dir), "--dataset", "wikitext-2-raw-v1"]):
        proc = subprocess.run([sys.executable, "main.py", "--mode", "baseline", *args, *FAST], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and "offline" in err[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_the_command_line_runs_as_a_script(model_dir, text_file, tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "--mode", "sequential", "--model", str(model_dir),
                           "--dataset", str(text_file), *FAST, "--save-results", "--output-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Removed" in proc.stdout and "Results written to" in proc.stderr
    assert len(results_of(tmp_path)) == N_LAYER + 1


def test_a_one_token_prompt_is_enough_for_the_speed_test(model_dir, text_file, tmp_path):
    assert kit(model_dir, text_file, "--mode", "baseline", "--max-tokens", "200", "--speed-runs", "1", "--speed-warmup", "0", "--gen-tokens", "2", "--prompt", "the", out=tmp_path) == 0
    assert results_of(tmp_path).latency_ms.iloc[0] > 0


def test_runs_started_in_the_same_second_get_files_of_their_own(tmp_path):
    taken = results_path(str(tmp_path), "distilgpt2", "random")
    Path(taken).write_text("another run's rows\n")
    out = ResultsFile(taken)
    out.start(COLUMNS)
    out.write({"removed_layers": [], "perplexity": 1.0})
    assert out.path != taken and Path(taken).read_text() == "another run's rows\n"
    assert len(read_rows(out.path)) == 1


def resume_problems(tmp_path, full):
    header, *rows = full.read_text().splitlines()
    old = tmp_path / "old-version.csv"  # a file from a version of the kit with fewer columns
    old.write_text("\n".join([",".join(header.split(",")[:-1])] + [r.rsplit(",", 1)[0] for r in rows[:2]]) + "\n")
    other_dtype = tmp_path / "bfloat16.csv"
    other_dtype.write_text("\n".join([header, *(r.replace(",float32,", ",bfloat16,") for r in rows[:2])]) + "\n")
    latin = tmp_path / "latin-1.txt"
    latin.write_bytes("caf\xe9 au lait, na\xefve r\xe9sum\xe9\n".encode("latin-1") * 50)
    return [(["--resume", str(old)], "other columns"),
            (["--resume", str(other_dtype)], "dtype bfloat16"),
            (["--dataset", str(latin)], "not UTF-8")]


def test_resuming_an_incompatible_file_or_reading_a_non_utf8_one_is_a_one_line_error(model_dir, text_file, tmp_path,
                                                                                   capsys):
    assert kit(model_dir, text_file, "--mode", "sequential", *FAST, out=tmp_path / "full") == 0
    [full] = (tmp_path / "full").glob("*.csv")
    capsys.readouterr()
    for args, message in resume_problems(tmp_path, full):
        before = {p: p.read_bytes() for p in tmp_path.glob("*.csv")}
        assert main.main(["--mode", "sequential", "--model", str(model_dir), "--dataset", str(text_file),
                          *FAST, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert {p: p.read_bytes() for p in tmp_path.glob("*.csv")} == before  # nothing appended
