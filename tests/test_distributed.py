"""A sweep split over processes (accelerate launch) or over jobs (--shard,
then --mode merge) gives the rows of one single-process run; only the timing
columns, which measure wall time, may differ."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import main
from conftest import ROOT, only_csv, quick
from tiny import N_EXAMPLES, TASK, make_model, make_text, make_tokenizer, save_model_dir, write_task
from runner.processes import WORLD_SIZE_VARS, current_processes, share

FAST = ["--mode", "combinatorial", *quick(300, "--max-length", "64")]
N_CONFIGS = 1 + 6 + 4  # baseline, C(4,2), C(4,3)



@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    text = make_text(300)
    tokenizer = make_tokenizer(text)
    (folder / "corpus.txt").write_text(text, encoding="utf-8")
    save_model_dir(folder / "model", make_model(n_layer=4, vocab_size=len(tokenizer)), tokenizer)
    return folder / "model", folder / "corpus.txt"


def sweep(inputs, out: Path, *extra: str) -> int:
    model_dir, text_file = inputs
    return main.main(["--model", str(model_dir), "--dataset", str(text_file), *FAST, "--quiet", "--save_results",
                      "--output-dir", str(out), *extra])


# Columns that differ between runs of the same configuration: wall-clock measurements and when they were taken.
TIMING_COLUMNS = ("latency_ms", "latency_iqr_ms", "prefill_ms", "tokens_per_s", "speed_change_pct", "timestamp",
                  "speed_change_low_pct", "speed_change_high_pct", "baseline_latency_ms")


def comparable(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).drop(columns=list(TIMING_COLUMNS))


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> Path:
    """The reference: one process, no sharding."""
    out = tmp_path_factory.mktemp("single")
    assert sweep(inputs, out) == 0
    return only_csv(out)


@pytest.fixture(scope="module")
def shard_files(inputs, tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("shards")
    for i in range(3):
        assert sweep(inputs, out, "--shard", f"{i}/3") == 0
    return sorted(out.glob("*.csv"))


def test_shares_cover_the_plan_exactly_once():
    plan = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    for count in range(1, 5):
        shares = [share(plan, i, count) for i in range(count)]
        assert sorted(c for s in shares for c in s) == sorted(plan)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_plain_python_starts_no_process_group(single, monkeypatch):
    for name in WORLD_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    procs = current_processes("auto")
    assert (procs.index, procs.count, procs.is_main, procs.device) == (0, 1, True, None)
    assert not torch.distributed.is_initialized()


def test_each_shard_holds_the_baseline_and_its_share(single, shard_files):
    assert [p.name.split("_")[-2] for p in shard_files] == [f"combinatorial-shard{i}of3" for i in range(3)]
    planned = pd.read_csv(single).removed_layers.tolist()[1:]
    for i, path in enumerate(shard_files):
        rows = pd.read_csv(path)
        assert rows.removed_layers.tolist() == ["[]"] + planned[i::3]


def test_shards_merged_equal_an_unsharded_run(single, shard_files, tmp_path):
    assert main.main(["--mode", "merge", "--inputs", *map(str, reversed(shard_files)), "--quiet",
                      "--output-dir", str(tmp_path)]) == 0
    merged = only_csv(tmp_path)
    assert merged.name.split("_")[-2] == "combinatorial"
    pd.testing.assert_frame_equal(comparable(merged), comparable(single))
    # like every run that writes a CSV, a merge writes its metadata and report beside it
    meta = json.loads(merged.with_suffix(".json").read_text())
    assert meta["merged_from"] == [str(p) for p in reversed(shard_files)]
    assert merged.with_name(merged.stem + "_report.md").is_file()


@pytest.mark.parametrize("problem, expected", [
    ("same file twice", "is given twice in --inputs"),
    ("overlapping runs", "appears twice, in '"),
    ("another model", "merge only the shards of one sweep"),
])
def test_merge_rejects_inputs_that_are_not_disjoint_shards_of_one_sweep(problem, expected, single, shard_files,
                                                                        tmp_path, capsys):
    if problem == "same file twice":
        files = [shard_files[0], shard_files[1], shard_files[0]]
    elif problem == "overlapping runs":
        files = [shard_files[0], single]
    else:
        other = pd.read_csv(shard_files[1]).assign(model="gpt2")
        other.to_csv(tmp_path / "other.csv", index=False)
        files = [shard_files[0], tmp_path / "other.csv"]
    out = tmp_path / "merged"
    code = main.main(["--mode", "merge", "--inputs", *map(str, files), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["--mode", "merge"], "--mode merge needs --inputs"),
    (["--mode", "sequential", "--inputs", "a.csv"], "--inputs is only used by --mode merge"),
    (["--mode", "sequential", "--shard", "3/3"], "valid values are 0..2"),
    (["--mode", "sequential", "--shard", "1-3"], "expected I/N such as 0/4"),
])
def test_bad_sharding_options(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(argv)
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_resume_a_run_into_the_rows_of_one_process(inputs, single, tmp_path):
    """accelerate launch, two CPU processes talking over gloo: the main process
    gathers both shares into the one file, after the rows a crashed run had
    already written. (accelerate's --cpu launcher starts one process unless MPI
    is set up; its --multi_gpu launcher, torch elastic, starts N on any machine.)"""
    lines = single.read_text(encoding="utf-8").splitlines(keepends=True)
    partial = tmp_path / "partial.csv"
    partial.write_text("".join(lines[:4]), encoding="utf-8")  # header, baseline, two configurations
    model_dir, text_file = inputs
    env = {k: v for k, v in os.environ.items() if k not in WORLD_SIZE_VARS}
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    done = subprocess.run([*launch, "main.py", "--model", str(model_dir), "--dataset", str(text_file), *FAST,
                           "--resume", str(partial)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "process 1 of 2" in done.stderr and "(2 already in" in done.stderr and "over 2 processes" in done.stderr
    resumed = pd.read_csv(partial)
    assert len(resumed) == N_CONFIGS
    pd.testing.assert_frame_equal(pd.read_csv(partial).iloc[:3], pd.read_csv(single).iloc[:3])  # kept as written
    key = lambda frame: frame.set_index("removed_layers").sort_index()
    pd.testing.assert_frame_equal(key(comparable(partial)), key(comparable(single)))


@pytest.mark.slow
def test_two_processes_work_from_the_main_process_choice(inputs, tmp_path):
    """A choosing mode under accelerate launch: the main process chooses on calibration tokens and
    broadcasts the plan, so the two processes' rows are exactly those of a one-process run, their
    downstream task scores included (each process scores its own configurations with lm-eval)."""
    model_dir, text_file = inputs
    tasks = write_task(tmp_path)
    greedy = ["--mode", "greedy", "--num-remove", "2", "--calib-tokens", "400", "--max-tokens", "300",
              "--max-length", "64", "--no-speed", "--tasks", TASK, "--include-path", str(tasks)]
    alone = tmp_path / "alone"
    assert main.main(["--model", str(model_dir), "--dataset", str(text_file), *greedy, "--quiet",
                      "--save_results", "--output-dir", str(alone)]) == 0
    env = {k: v for k, v in os.environ.items() if k not in WORLD_SIZE_VARS}
    env["OMP_NUM_THREADS"] = "1"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    together = tmp_path / "together"
    done = subprocess.run([*launch, "main.py", "--model", str(model_dir), "--dataset", str(text_file), *greedy,
                           "--save_results", "--output-dir", str(together)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "over 2 processes" in done.stderr
    rows = comparable(only_csv(together))
    assert rows[f"task:{TASK}:n"].tolist() == [N_EXAMPLES] * len(rows)
    pd.testing.assert_frame_equal(rows, comparable(only_csv(alone)))


def test_only_the_main_process_chooses_the_others_receive_its_plan(monkeypatch):
    from dataclasses import replace
    from types import SimpleNamespace

    from config import RunConfig, WindowSpec
    from runner.modes import MODES
    from runner.evaluate import removal_sets
    from runner.processes import Processes

    chose = []
    monkeypatch.setitem(MODES, "greedy", replace(MODES["greedy"], choose=lambda *a: chose.append(a)))
    sent = ([(2,), (1, 2)], {(2,): {"metric": "greedy"}})
    worker = Processes(index=1, count=2, _broadcast=lambda outcome: [("ok", sent)])
    loaded = SimpleNamespace(planned=None, model=None, tokenizer=None, stream=None, cache_dir=None,
                             settings=SimpleNamespace(windows=WindowSpec(64, 32), progress=False))
    removals, choice = removal_sets(RunConfig(mode="greedy"), loaded, worker)
    assert chose == [] and removals == sent[0] and choice.extras == sent[1] and choice.report is None
