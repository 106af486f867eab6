"""Faults that used to lose work, mix rows that do not compare, or run foreign code.

Each test reproduces one fault as a user would meet it and checks the exit
status, the one stderr line, the files left behind, and that nothing already
written was lost or changed.
"""

import errno
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import main
from conftest import ROOT, kit, quick
from models.removal import removed_blocks
from reporting import csvfile
from tiny import make_model, save_model_dir

FAST = quick(400, "--max-length", "64", "--quiet")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def no_model_loading(monkeypatch):
    """Fail the test if the run gets as far as loading the model."""
    import runner.evaluate

    monkeypatch.setattr(runner.evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


# ---- outputs checked before any work ---------------------------------------------------------

def test_a_file_given_as_output_dir_fails_before_the_model_is_loaded(model_dir, text_file, tmp_path, capsys,
                                                                    monkeypatch):
    no_model_loading(monkeypatch)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert kit(model_dir, text_file, "--mode", "sequential", *FAST, "--save_results", "--output-dir", str(blocker)) == 2
    assert "is a file, not a folder" in one_error_line(capsys)


def test_an_unwritable_output_dir_fails_before_the_model_is_loaded(model_dir, text_file, tmp_path, capsys,
                                                                   monkeypatch):
    no_model_loading(monkeypatch)
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args)

    monkeypatch.setattr(csvfile.os, "open", read_only)
    assert kit(model_dir, text_file, "--mode", "sequential", *FAST, "--save_results", "--output-dir", str(tmp_path / "out")) == 2
    assert "Read-only file system" in one_error_line(capsys)


def test_an_unwritable_save_model_folder_fails_before_the_model_is_loaded(model_dir, text_file, tmp_path, capsys,
                                                                          monkeypatch):
    no_model_loading(monkeypatch)
    (tmp_path / "file").write_text("x")
    assert kit(model_dir, text_file, "--mode", "custom", "--remove", "1", *FAST, "--save-model", str(tmp_path / "file" / "pruned")) == 2
    assert "--save-model cannot write into" in one_error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--gen-tokens", "200"], "plus --gen-tokens 200 exceeds the model's context size of 128 tokens"),
    (["--prompt", "the river " * 100], "exceeds the model's context size of 128 tokens"),
    (["--max-length", "1"], "--max-length 1 leaves no token to score"),
])
def test_impossible_settings_stop_before_any_evaluation(args, message, model_dir, text_file, tmp_path, capsys,
                                                        monkeypatch):
    import runner.evaluate

    monkeypatch.setattr(runner.evaluate, "measure_all", lambda *a, **k: pytest.fail("evaluation started"))
    speed = [] if "--max-length" in args else ["--speed-runs", "1", "--speed-warmup", "0"]
    code = kit(model_dir, text_file, "--mode", "sequential", "--max-tokens", "300", *speed, *args, "--quiet", "--save_results", "--output-dir", str(tmp_path / "out"))
    assert code == 2 and message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_model_that_scales_attention_by_layer_index_is_refused_before_its_baseline(tokenizer, text_file, tmp_path,
                                                                                     capsys):
    config = GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tokenizer),
                        scale_attn_by_inverse_layer_idx=True)
    model_dir = save_model_dir(tmp_path / "model", GPT2LMHeadModel(config), tokenizer)
    out = tmp_path / "out"
    assert kit(model_dir, text_file, "--mode", "sequential", *FAST, "--save_results", "--output-dir", str(out)) == 2
    assert "scale_attn_by_inverse_layer_idx" in one_error_line(capsys)
    assert not out.exists()  # no CSV, no sidecar, not even the folder


def test_a_truncated_checkpoint_or_a_missing_tokenizer_is_one_line(model_dir, text_file, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert kit(broken, text_file, "--mode", "baseline", *FAST) == 2
    assert one_error_line(capsys).startswith(f"error: cannot load model '{broken}'")

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    assert kit(bare, text_file, "--mode", "baseline", *FAST) == 2
    assert "tokenizer" in one_error_line(capsys)


def test_combinatorial_refuses_a_huge_plan_before_reading_the_data(tokenizer, text_file, tmp_path, capsys,
                                                                   monkeypatch):
    import runner.evaluate

    deep = save_model_dir(tmp_path / "deep", make_model(n_layer=16, vocab_size=len(tokenizer), n_embd=8),
                          tokenizer)
    monkeypatch.setattr(runner.evaluate, "cached_token_ids", lambda *a, **k: pytest.fail("the data was read"))
    assert kit(deep, text_file, "--mode", "combinatorial", *FAST) == 2
    line = one_error_line(capsys)
    assert "65,518 configurations" in line  # 2^16 - 1 - 16 - 1 and "--max-configs 5,000" in line


def test_save_model_and_healing_are_refused_with_a_shard(capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(["--mode", "custom", "--remove", "1,2", "--shard", "1/2", "--save-model", "D"])
    assert exit_.value.code == 2
    assert "--save-model and --heal-steps need the whole run's result" in one_error_line(capsys)


# ---- writes that survive a crash -------------------------------------------------------------

def test_a_full_disk_mid_sweep_keeps_the_rows_written(model_dir, text_file, tmp_path, capsys, monkeypatch):
    real_write, calls = os.write, []

    def fills_up(fd, data):
        calls.append(len(data))
        if len(calls) == 4:  # header, baseline, one configuration, then the disk is full mid-row
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(csvfile.os, "write", fills_up)
    out = tmp_path / "out"
    assert kit(model_dir, text_file, "--mode", "sequential", *FAST, "--save_results", "--output-dir", str(out)) == 1
    line = one_error_line(capsys)
    [csv_path] = out.glob("*.csv")
    assert f"cannot write a row to '{csv_path}': No space left on device" in line and "intact" in line
    assert csv_path.read_bytes().endswith(b"\n")  # the half row was cut off
    assert len(pd.read_csv(csv_path)) == 2
    assert not list(out.glob("*.tmp"))


def test_a_failed_sidecar_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from reporting import sidecar

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    from utils import files

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(Exception, match="No space left"):
        sidecar.write_sidecar(str(tmp_path / "r.csv"), {}, {"started": "now"})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_model_leaves_the_target_as_it_was_and_can_be_rerun(model_dir, text_file, tmp_path, capsys,
                                                                          monkeypatch):
    target = tmp_path / "pruned"
    target.mkdir()  # an empty folder is accepted, and must still be there, empty, after the failure
    real = GPT2LMHeadModel.save_pretrained

    def full_disk(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", full_disk)
    args = ["--mode", "custom", "--remove", "1", *FAST, "--save-model", str(target)]
    assert kit(model_dir, text_file, *args) == 1
    assert "nothing was saved" in one_error_line(capsys)
    assert list(target.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", real)
    assert kit(model_dir, text_file, *args) == 0
    assert (target / "model.safetensors").is_file()


# ---- resume only the same experiment ---------------------------------------------------------

@pytest.fixture
def started(model_dir, text_file, tmp_path):
    """A finished sequential results file (the baseline and 4 rows) and a copy of the data it used."""
    data = tmp_path / "data.txt"
    shutil.copy(text_file, data)
    out = tmp_path / "out"
    assert kit(model_dir, data, "--mode", "sequential", *FAST, "--save_results", "--output-dir", str(out)) == 0
    [path] = out.glob("*.csv")
    return path, data


@pytest.mark.parametrize("change, message", [
    (["--max-length", "32"], "was made with --max-length 64, this run has 32;"),
    (["--stride", "16"], "was made with --stride 32, this run has 16;"),
    (["--mode", "combinatorial"], "was made with --mode sequential, this run has combinatorial;"),
    ("edit the data", "was made with other --dataset text"),
])
def test_resume_refuses_another_experiment_naming_the_field(change, message, started, model_dir, capsys):
    path, data = started
    before = path.read_bytes()
    if change == "edit the data":
        data.write_text(data.read_text() + " One more sentence.", encoding="utf-8")
        change = []
    argv = ["--mode", "sequential", *FAST, *change, "--resume", str(path)]
    if "--mode" in change:
        argv = [*FAST, *change, "--resume", str(path)]
    assert kit(model_dir, data, *argv) == 2
    assert message in one_error_line(capsys)
    assert path.read_bytes() == before


def test_resume_of_a_file_without_its_sidecar_refuses_another_window_convention(started, model_dir, capsys):
    """An older file (no sidecar identity): its rows' protocol column still guards the windows."""
    path, data = started
    path.with_suffix(".json").unlink()
    before = path.read_bytes()
    assert kit(model_dir, data, "--mode", "sequential", *FAST, "--protocol", "disjoint", "--resume", str(path)) == 2
    assert "--protocol sliding, this run has disjoint" in one_error_line(capsys)
    assert path.read_bytes() == before


def test_resume_refuses_a_file_whose_baseline_row_was_edited(started, model_dir, capsys):
    path, data = started
    rows = pd.read_csv(path)
    rows.loc[0, "perplexity"] = rows.perplexity[0] * 10
    rows.to_csv(path, index=False)
    assert kit(model_dir, data, "--mode", "sequential", *FAST, "--resume", str(path)) == 2
    line = one_error_line(capsys)
    assert "the baseline row" in line and "changed after it was written" in line


def test_a_half_written_last_row_is_dropped_and_evaluated_again(started, model_dir, capsys):
    path, data = started
    whole = pd.read_csv(path)
    text = path.read_bytes()
    path.write_bytes(text[: text.rfind(b"\n", 0, len(text) - 1) + 20])  # the last row cut after 19 bytes
    assert main.main(["--mode", "report", "--input", str(path)]) == 0
    assert "half-written row" in capsys.readouterr().err
    assert len(csvfile.read_rows(str(path))) == len(whole) - 1  # the cut row is not read as a row of zeros
    assert kit(model_dir, data, "--mode", "sequential", *FAST, "--resume", str(path)) == 0
    assert "dropped" in capsys.readouterr().err
    again = pd.read_csv(path)
    assert again.removed_layers.tolist() == whole.removed_layers.tolist()
    assert again.perplexity.tolist() == whole.perplexity.tolist()


def test_a_second_writer_on_the_same_file_is_refused(started, model_dir, capsys):
    path, data = started
    with open(path, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another run is appending to it
        assert kit(model_dir, data, "--mode", "sequential", *FAST, "--resume", str(path)) == 2
    assert "is being written by another run" in one_error_line(capsys)


def test_report_refuses_duplicate_configurations(started, capsys):
    path, _ = started
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines + lines[2:3]))
    assert main.main(["--mode", "report", "--input", str(path)]) == 2
    assert "holds configuration [0] twice" in one_error_line(capsys)


# ---- merge only what is complete -------------------------------------------------------------

@pytest.fixture
def shards(model_dir, text_file, tmp_path):
    out = tmp_path / "shards"
    for i in range(3):
        assert kit(model_dir, text_file, "--mode", "sequential", *FAST, "--shard", f"{i}/3", "--save_results", "--output-dir", str(out)) == 0
    return sorted(out.glob("*.csv"))


def test_merge_refuses_a_missing_shard_unless_asked_for_a_partial_merge(shards, tmp_path, capsys):
    out = tmp_path / "merged"
    two = [str(shards[0]), str(shards[2])]
    assert main.main(["--mode", "merge", "--inputs", *two, "--output-dir", str(out), "--quiet"]) == 2
    assert "shard 1/3 of this sweep is missing" in one_error_line(capsys)
    assert not out.exists()
    assert main.main(["--mode", "merge", "--inputs", *two, "--allow-partial", "--output-dir", str(out),
                      "--quiet"]) == 0
    [merged] = out.glob("*.csv")
    assert "_sequential-partial_" in merged.name
    assert "Partial results" in merged.with_name(merged.stem + "_report.md").read_text()
    assert json.loads(merged.with_suffix(".json").read_text())["partial"] is True


def test_a_complete_merge_is_not_labelled_partial_by_allow_partial(shards, tmp_path):
    out = tmp_path / "merged"
    assert main.main(["--mode", "merge", "--inputs", *map(str, shards), "--allow-partial", "--output-dir", str(out),
                      "--quiet"]) == 0
    [merged] = out.glob("*.csv")
    assert "partial" not in merged.name
    assert json.loads(merged.with_suffix(".json").read_text()).get("partial") is not True


def test_merge_refuses_shards_of_another_dtype(shards, tmp_path, capsys):
    other = tmp_path / "other.csv"
    pd.read_csv(shards[1]).assign(dtype="bfloat16").to_csv(other, index=False)
    shutil.copy(shards[1].with_suffix(".json"), other.with_suffix(".json"))
    assert main.main(["--mode", "merge", "--inputs", str(shards[0]), str(other), str(shards[2]),
                      "--output-dir", str(tmp_path / "m")]) == 2
    assert "has dtype 'bfloat16'" in one_error_line(capsys)


# ---- healing, progress, reports --------------------------------------------------------------

def test_full_healing_in_bfloat16_keeps_float32_master_weights(tokenizer, text):
    from config import HealSpec
    from export.heal import heal

    ids = torch.tensor(tokenizer(text)["input_ids"])
    changed = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(vocab_size=len(tokenizer)).to(dtype)
        spec = HealSpec(steps=10, mode="full", lr=2e-5, batch_size=2, seq_len=32)  # the default lr
        healed = heal(model, [1], ids, spec, progress=False).model
        assert next(healed.parameters()).dtype == dtype
        with removed_blocks(model, [1]) as pruned:  # the teacher is untouched: the student's starting point
            before = dict(pruned.named_parameters())
            after = dict(healed.named_parameters())
            changed[dtype] = (sum(int((after[n] != before[n]).sum()) for n in after)
                              / sum(p.numel() for p in after.values()))
    # measured: 94% in float32, 74% in bfloat16 (what survives the final cast), 41% when AdamW stepped the
    # bfloat16 weights themselves
    assert changed[torch.float32] > 0.9 and changed[torch.bfloat16] > 0.6, changed


def test_progress_bars_in_a_log_file_redraw_at_most_every_30_seconds(monkeypatch):
    from utils import log

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert log.progress_bar(total=3, file=io.StringIO()).mininterval == log.LOG_FILE_INTERVAL == 30.0
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert log.progress_bar(total=3, file=io.StringIO()).mininterval == 0.1


def test_compare_tables_reach_report_md_and_the_sidecar(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert kit(model_dir, text_file, "--mode", "compare", "--max-remove", "2", "--calib-tokens", "600", *FAST, "--save_results", "--output-dir", str(out)) == 0
    [path] = out.glob("*.csv")
    report = path.with_name(path.stem + "_report.md").read_text()
    record = json.loads(path.with_suffix(".json").read_text())
    for text in (report, record["mode_report"]):
        assert "Rules against the exhaustive optimum" in text and "Spearman correlation" in text
    path.with_name(path.stem + "_report.md").unlink()
    assert main.main(["--mode", "report", "--input", str(path)]) == 0  # made again from the CSV and sidecar
    assert "Rules against the exhaustive optimum" in path.with_name(path.stem + "_report.md").read_text()


# ---- foreign code ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_model_with_its_own_code_is_refused_even_when_stdin_says_yes(model_dir, text_file, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(model_dir, custom)
    marker = tmp_path / "code-ran"
    (custom / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import GPT2Config as EvilConfig\n")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (custom / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "main.py", "--mode", "baseline", "--model", str(custom), "--dataset",
                           str(text_file), *FAST], cwd=ROOT, input="y\ny\n", capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "asks to run its own code" in lines[0] and "--trust-remote-code" in lines[0]
    assert not marker.exists()
