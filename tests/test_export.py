"""--save-model: a standard checkpoint with a model card, which reloads
anywhere (a fresh process, plain transformers) to the model that was measured."""

from __future__ import annotations

import json
import re
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import main
from models.removal import removed_blocks
from tiny import make_model, make_text, make_tokenizer, save_model_dir
from export.card import model_card
from export.checkpoint import REPORT_FILE, healing_table
from reporting.csvfile import read_rows

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train_text = make_text(600, seed=0)
    save_model_dir(root / "model", make_model(), make_tokenizer(train_text))
    (root / "train.txt").write_text(train_text, encoding="utf-8")
    (root / "eval.txt").write_text(make_text(120, seed=1), encoding="utf-8")
    return root


def run_kit(files: Path, out: str, *extra: str) -> tuple[Path, dict]:
    """One kit run that saves a model; its output folder and the CSV row of the chosen configuration."""
    argv = ["--model", str(files / "model"), "--dataset", str(files / "eval.txt"), "--max-length", "64",
            "--save-results", "--output-dir", str(files / out / "results"), "--save-model", str(files / out / "model"),
            "--quiet", *extra]
    assert main.main(argv) == 0
    (csv_file,) = (files / out / "results").glob("*.csv")
    return files / out / "model", read_rows(str(csv_file))[-1]


@pytest.fixture(scope="module")
def healed(files):
    return run_kit(files, "healed", "--mode", "custom", "--remove", "1,2", "--heal-steps", "8", "--heal-lr", "1e-2",
                   "--heal-seq-len", "64", "--train-dataset", str(files / "train.txt"), "--speed-runs", "1",
                   "--speed-warmup", "0", "--gen-tokens", "4")


@pytest.mark.slow
def test_healed_export_reloads_in_a_fresh_process_to_the_reported_perplexity(healed, files):
    model_dir, pruned_row = healed
    report = json.loads((model_dir / REPORT_FILE).read_text())
    assert report["healing"]["perplexity"] == report["checkpoint_perplexity"] != pruned_row["perplexity"]

    # exactly the command the model card gives, in a new interpreter
    command = shlex.split(report["reproduce"])[1:] + ["--save-results", "--output-dir", str(files / "again")]
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    (csv_file,) = (files / "again").glob("*.csv")
    (row,) = read_rows(str(csv_file))
    assert row["num_layers"] == 2
    assert row["perplexity"] == report["checkpoint_perplexity"]


def test_healed_export_is_a_plain_safetensors_gpt2_without_peft(healed):
    model_dir, _ = healed
    names = set(os.listdir(model_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not any(name.startswith("adapter_") for name in names)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("lora" in key or "base_model" in key for key in keys)
    assert {key.split(".")[2] for key in keys if key.startswith("transformer.h.")} == {"0", "1"}
    assert json.loads((model_dir / "config.json").read_text())["n_layer"] == 2


def test_model_card_states_removed_blocks_numbers_before_and_after_and_the_command(healed):
    model_dir, pruned_row = healed
    card = (model_dir / "README.md").read_text()
    report = json.loads((model_dir / REPORT_FILE).read_text())
    assert report["removed_blocks"] == [1, 2] and report["kept_blocks"] == [0, 3]
    assert "## Removed blocks\n\n`[1, 2]`" in card
    assert "| Transformer blocks | 4 | 2 | -50.00% |" in card
    assert f"{pruned_row['perplexity']:,.2f}" in card  # pruned, before healing
    assert f"{report['healing']['perplexity']:,.2f}" in card  # after healing
    assert f"{report['original']['latency_ms']:,.2f}" in card and f"{pruned_row['latency_ms']:,.2f}" in card
    assert "--heal-steps 8" in card and "--remove 1,2" in card
    assert report["reproduce"] in card


def test_model_card_changes_are_the_pruned_against_the_original_numbers(healed):
    model_dir, pruned_row = healed
    card = (model_dir / "README.md").read_text()
    report = json.loads((model_dir / REPORT_FILE).read_text())
    original, pruned = report["original"], report["pruned"]
    assert pruned["perplexity"] == pruned_row["perplexity"] and pruned["latency_ms"] == pruned_row["latency_ms"]
    for name, key in [("Parameters (M)", "params"), ("Perplexity", "perplexity")]:
        change = (pruned[key] - original[key]) / original[key] * 100
        assert re.search(rf"^\| {re.escape(name)} \| [\d,.]+ \| [\d,.]+ \| {re.escape(f'{change:+,.2f}')}% \|$", card, re.M), name
    # speed: against the original's runs interleaved with the pruned model's; one run per model bounds nothing
    change = pruned["speed_change_pct"]
    assert change == pytest.approx((pruned["latency_ms"] / pruned["baseline_latency_ms"] - 1) * 100)
    faster = (1 / (1 + change / 100) - 1) * 100
    for name, pct in [("Generation latency (ms, median)", change), ("Generated tokens/s", faster)]:
        assert re.search(rf"^\| {re.escape(name)} \| [\d,.]+ \| [\d,.]+ \| {re.escape(f'{pct:+.2f}')}% "
                         r"\(within the timing noise: too few runs for an interval\) \|$", card, re.M), name
    assert re.search(r"^\| Prefill latency \(ms\) \| [\d,.]+ \| [\d,.]+ \|  \|$", card, re.M)
    healed_change = (report["healing"]["perplexity"] - original["perplexity"]) / original["perplexity"] * 100
    assert f"| Pruned and healed (this checkpoint) | {report['healing']['perplexity']:,.2f} | {healed_change:+,.2f}% |" in card


def test_export_without_healing_is_the_measured_pruned_model(files):
    model_dir, pruned_row = run_kit(files, "plain", "--mode", "custom", "--remove", "0,3", "--no-speed")
    report = json.loads((model_dir / REPORT_FILE).read_text())
    assert report["healing"] is None and report["checkpoint_perplexity"] == pruned_row["perplexity"]

    original = AutoModelForCausalLM.from_pretrained(files / "model").eval()
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("The old bridge crossed the valley", return_tensors="pt").input_ids
    settings = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0,
                    attention_mask=torch.ones_like(ids))
    with torch.no_grad(), removed_blocks(original, [0, 3]) as pruned:
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
        assert torch.equal(reloaded.generate(ids, **settings), pruned.generate(ids, **settings))
    assert "`[0, 3]`" in (model_dir / "README.md").read_text()


def test_healing_table_changes_are_against_the_original():
    rows = [{"num_layers": 4, "perplexity": 40.0}, {"num_layers": 2, "perplexity": 50.0}]
    lines = healing_table(rows, healed_ppl=44.0).splitlines()
    assert lines[2].split() == ["Original", "4", "40.00"]
    assert lines[3].split() == ["Pruned", "2", "50.00", "+25.00"]
    assert lines[4].split() == ["Pruned", "+", "healed", "2", "44.00", "+10.00"]


def card_of(pruned_speed: dict) -> str:
    """The model card of a made-up export whose pruned row has the given speed columns."""
    original = {"num_layers": 6, "perplexity": 39.29, "params": 81_912_576, "params_m": 81.91, "latency_ms": 1561.0,
                "latency_iqr_ms": 24.0, "prefill_ms": 30.0, "tokens_per_s": 41.0}
    pruned = {**original, "num_layers": 5, "params_m": 74.82, "latency_ms": 742.0, "latency_iqr_ms": 311.0,
              "tokens_per_s": 86.3, **pruned_speed}
    return model_card({"original": original, "pruned": pruned, "healing": None, "source_model": "distilgpt2",
                       "model_type": "gpt2", "mode": "custom", "removed_blocks": [3], "kept_blocks": [0, 1, 2, 4, 5],
                       "checkpoint_perplexity": 69.57, "reproduce": "python main.py", "command": "python main.py",
                       "versions": {"torch": "2", "transformers": "5"}, "created": "2026-11-30",
                       "evaluation": {"dataset": "wikitext-2-raw-v1", "split": "test", "scored_tokens": 1000,
                                      "max_length": 1024, "stride": 512, "device": "cpu", "dtype": "float32",
                                      "speed_runs": 10, "gen_tokens": 64}})


def test_model_card_says_when_the_speed_change_is_within_the_noise():
    # the incident's export: against the original's own runs 52% faster, against its interleaved runs -2.37%
    card = card_of({"baseline_latency_ms": 760.0, "speed_change_pct": -2.368, "speed_change_low_pct": -41.0,
                    "speed_change_high_pct": 35.0})
    assert "| Generation latency (ms, median) | 1,561.00 | 742.00 | -2.37% (within the timing noise: -41.00% to " \
           "+35.00%) |" in card
    assert "| Generated tokens/s | 41.0 | 86.3 | +2.43% (within the timing noise: -25.93% to +69.49%) |" in card
    assert "-52." not in card and "alternated with 10 runs of the original (median 760.00 ms)" in card


def test_model_card_gives_a_measured_speed_change_its_interval():
    card = card_of({"baseline_latency_ms": 900.0, "speed_change_pct": -17.56, "speed_change_low_pct": -19.0,
                    "speed_change_high_pct": -15.0})
    assert "| Generation latency (ms, median) | 1,561.00 | 742.00 | -17.56% (95% interval -19.00% to -15.00%) |" in card
    assert "% (within the timing noise" not in card
