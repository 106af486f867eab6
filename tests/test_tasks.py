"""Downstream tasks through lm-evaluation-harness (--tasks), offline: a tiny
multiple-choice task written as lm-eval YAML over a jsonl file, scored on the
tiny GPT-2 of conftest and checked against the model's own log-likelihoods."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import main
from conftest import IDENTITY_BLOCK, N_LAYER, quick
from reporting.csvfile import read_rows
from reporting.schema import COLUMNS, task_column
from tiny import N_EXAMPLES, TASK, YAML, examples, make_text, write_task

# every test here scores lm-eval tasks
pytestmark = pytest.mark.slow

FAST = quick(600, "--max-length", "64")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def sweep(model_dir, text_file, task_dir, tmp_path_factory):
    """A sequential sweep scored on the task; its CSV rows, keyed by removed blocks."""
    out = tmp_path_factory.mktemp("results")
    assert main.main(["--mode", "sequential", "--model", str(model_dir), "--dataset", str(text_file), *FAST,
                      "--tasks", TASK, "--include-path", str(task_dir), "--plot", "--output-dir", str(out)]) == 0
    [path] = out.glob("*.csv")
    return path, {tuple(r["removed_layers"]): r for r in read_rows(str(path))}


@torch.no_grad()
def choice_logliks(model_dir: Path, removed: tuple[int, ...]) -> list[list[float]]:
    """log P(" " + choice | query) under the model with ``removed`` blocks dropped, computed directly."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.transformer.h = nn.ModuleList(b for i, b in enumerate(model.transformer.h) if i not in removed)
    result = []
    for e in examples():
        context = tok(e["query"])["input_ids"]
        scores = []
        for choice in e["choices"]:
            whole = tok(e["query"] + " " + choice)["input_ids"]
            logprobs = torch.log_softmax(model(torch.tensor([whole]), use_cache=False).logits[0, :-1].float(), -1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        result.append(scores)
    return result


def accuracy(logliks: list[list[float]], normalise: bool = False) -> float:
    right = 0
    for e, scores in zip(examples(), logliks):
        if normalise:
            scores = [s / len(c) for s, c in zip(scores, e["choices"])]
        right += max(range(len(scores)), key=scores.__getitem__) == e["label"]
    return right / len(logliks)


def test_every_row_has_the_task_columns_after_the_fixed_ones(sweep):
    path, rows = sweep
    header = list(pd.read_csv(path).columns)
    assert header[: len(COLUMNS)] == COLUMNS
    assert header[len(COLUMNS):] == [task_column(TASK, m) for m in (
        "n", "acc", "acc_stderr", "acc_change_pts", "acc_norm", "acc_norm_stderr", "acc_norm_change_pts")]
    assert sorted(rows) == [()] + [(i,) for i in range(N_LAYER)]
    for row in rows.values():
        assert row[task_column(TASK, "n")] == N_EXAMPLES
        assert 0 <= row[task_column(TASK, "acc")] <= 1 and row[task_column(TASK, "acc_stderr")] > 0


@pytest.mark.parametrize("removed", [(), (0,), (IDENTITY_BLOCK,)])
def test_accuracy_equals_the_models_own_choice_logliks(sweep, model_dir, removed):
    _, rows = sweep
    logliks = choice_logliks(model_dir, removed)
    assert rows[removed][task_column(TASK, "acc")] == pytest.approx(accuracy(logliks))
    assert rows[removed][task_column(TASK, "acc_norm")] == pytest.approx(accuracy(logliks, normalise=True))


def test_identity_block_leaves_the_score_and_block_0_changes_the_logliks(sweep, model_dir):
    _, rows = sweep
    base, identity = rows[()], rows[(IDENTITY_BLOCK,)]
    for metric in ("acc", "acc_norm", "acc_stderr"):
        assert identity[task_column(TASK, metric)] == base[task_column(TASK, metric)]
    assert identity[task_column(TASK, "acc_change_pts")] == 0.0
    full = torch.tensor(choice_logliks(model_dir, ()))
    assert torch.allclose(torch.tensor(choice_logliks(model_dir, (IDENTITY_BLOCK,))), full, atol=1e-5)
    assert not torch.allclose(torch.tensor(choice_logliks(model_dir, (0,))), full, atol=1e-3)
    change = (rows[(0,)][task_column(TASK, "acc")] - base[task_column(TASK, "acc")]) * 100
    assert rows[(0,)][task_column(TASK, "acc_change_pts")] == pytest.approx(change)


def test_report_figure_and_console_show_the_tasks(sweep, capsys):
    path, _ = sweep
    report = Path(str(path).replace(".csv", "_report.md")).read_text(encoding="utf-8")
    assert "## Downstream tasks" in report and f"{TASK} acc_norm (%)" in report
    assert Path(str(path).replace(".csv", "_tasks.png")).is_file()
    meta = json.loads(Path(str(path).replace(".csv", ".json")).read_text(encoding="utf-8"))
    assert meta["libraries"]["lm_eval"] == "0.4.13"
    assert meta["config"]["tasks"]["names"] == [TASK]
    assert meta["tasks"][TASK]["examples"] == N_EXAMPLES
    # --mode report draws the same from the CSV alone
    assert main.main(["--mode", "report", "--input", str(path)]) == 0
    assert "## Downstream tasks" in Path(str(path).replace(".csv", "_report.md")).read_text(encoding="utf-8")


def test_console_task_table_fits_80_columns():
    from reporting.tables import task_table

    names = ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"]
    row = lambda removed: {"removed_layers": removed, **{task_column(t, m): 0.5 for t in names for m in
                                                          ("acc", "acc_norm", "acc_change_pts", "acc_norm_change_pts")}}
    text = task_table([row([]), *(row(list(range(k))) for k in range(1, 12))])
    assert max(map(len, text.splitlines())) <= 80
    assert all(f"{t} {m}" in text for t in names for m in ("acc", "acc_norm"))


def test_resume_refuses_a_file_of_other_tasks(sweep, model_dir, text_file, capsys):
    path, _ = sweep
    code = main.main(["--mode", "sequential", "--model", str(model_dir), "--dataset", str(text_file), *FAST,
                      "--resume", str(path)])
    assert code == 2
    assert f"task columns of --tasks {TASK}" in capsys.readouterr().err


def test_a_task_whose_data_cannot_be_loaded_is_one_line_before_any_work(model_dir, text_file, tmp_path, capsys):
    """Offline, a Hub task fails the same way: its data cannot be fetched (the line names the task and
    --include-path)."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gone.yaml").write_text(YAML.format(name="gone", data=tmp_path / "missing.jsonl"))
    code = main.main(["--mode", "sequential", "--model", str(model_dir), "--dataset", str(text_file), *FAST,
                      "--tasks", "gone", "--include-path", str(tmp_path / "tasks"), "--save_results",
                      "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --tasks: could not load the data of task 'gone'")
    assert "--include-path" in err[-1]
    assert not (tmp_path / "out").exists()


def test_model_card_lists_original_pruned_and_healed_scores(model_dir, text_file, task_dir, tmp_path):
    target, train = tmp_path / "model", tmp_path / "train.txt"
    train.write_text(make_text(120, seed=1), encoding="utf-8")
    assert main.main(["--mode", "custom", "--remove", "1", "--model", str(model_dir), "--dataset", str(text_file),
                      *FAST, "--tasks", TASK, "--include-path", str(task_dir), "--heal-steps", "2", "--heal-seq-len",
                      "32", "--heal-batch-size", "2", "--train-dataset", str(train), "--save-model", str(target),
                      "--quiet"]) == 0
    report = json.loads((target / "pruning_report.json").read_text(encoding="utf-8"))
    assert set(report["tasks"]) == {"original", "pruned"}
    healed = report["healing"]["tasks"][TASK]
    assert healed["n"] == N_EXAMPLES and 0 <= healed["acc"] <= 1
    card = (target / "README.md").read_text(encoding="utf-8")
    assert "## Downstream tasks" in card and "| Original | Pruned | Healed |" in card
    assert f"| {TASK} | acc | {N_EXAMPLES} |" in card and "lm-evaluation-harness 0.4.13" in card


def test_task_options_without_tasks_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--mode", "sequential", "--limit", "5"])
    assert exit_info.value.code == 2 and "needs --tasks" in capsys.readouterr().err


def test_merge_keeps_the_task_columns_of_the_shards(sweep, model_dir, text_file, task_dir, tmp_path):
    _, whole = sweep
    for shard in ("0/2", "1/2"):
        assert main.main(["--mode", "sequential", "--model", str(model_dir), "--dataset", str(text_file), *FAST,
                          "--tasks", TASK, "--include-path", str(task_dir), "--shard", shard, "--save_results",
                          "--output-dir", str(tmp_path / "shards"), "--quiet"]) == 0
    inputs = sorted(str(p) for p in (tmp_path / "shards").glob("*.csv"))
    assert main.main(["--mode", "merge", "--inputs", *inputs, "--output-dir", str(tmp_path / "merged"), "--quiet"]) == 0
    [merged] = (tmp_path / "merged").glob("*.csv")
    rows = read_rows(str(merged))
    assert list(rows[0])[len(COLUMNS):] == [c for c in pd.read_csv(inputs[0]).columns[len(COLUMNS):]]
    for row in rows:
        for metric in ("acc", "acc_norm", "acc_change_pts"):
            assert row[task_column(TASK, metric)] == whole[tuple(row["removed_layers"])][task_column(TASK, metric)]
