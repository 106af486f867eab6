"""Faults a demanding user found (issue 23): each test reproduces one as the user met it and checks
the exit status, the one stderr line and what is left on disk; and generative lm-eval tasks scored
per configuration."""

import errno
import fcntl
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import main
from conftest import N_LAYER, kit, only_csv, quick
from reporting.csvfile import read_rows
from reporting.sidecar import read_sidecar
from tiny import OBJECTS, SUBJECTS, VERBS, make_model, save_model_dir

FAST = quick(400, "--max-length", "64", "--quiet")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def no_model_loading(monkeypatch):
    import runner.evaluate

    monkeypatch.setattr(runner.evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.fixture
def started(model_dir, text_file, tmp_path):
    """A finished sequential results file made on a copy of the model; (csv, model copy)."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "out"
    assert kit(model, text_file, "--mode", "sequential", *FAST, out=out) == 0
    return only_csv(out), model


def refused(model, text_file, capsys, *argv) -> str:
    capsys.readouterr()  # what earlier runs of the test printed
    assert kit(model, text_file, *argv) == 2
    return one_error_line(capsys)


# ---- --resume: the same experiment, by content -------------------------------------------------

def test_resume_accepts_the_same_model_given_by_a_relative_path(started, text_file, monkeypatch, capsys):
    path, model = started
    before = len(read_rows(str(path)))
    monkeypatch.chdir(model.parent)
    assert kit(Path("model"), text_file, "--mode", "sequential", *FAST, "--resume", str(path)) == 0
    assert len(read_rows(str(path))) == before  # nothing was left, nothing was added


def test_resume_refuses_another_model_copied_to_the_same_path(started, text_file, tokenizer, capsys):
    path, model = started
    before = path.read_bytes()
    shutil.rmtree(model)  # same architecture, same file names and sizes, other weights
    save_model_dir(model, make_model(n_layer=N_LAYER, vocab_size=len(tokenizer), seed=1), tokenizer)
    line = refused(model, text_file, capsys, "--mode", "sequential", *FAST, "--resume", str(path))
    assert f"was made with another model than --model '{model}'" in line
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode, first, then, message", [
    ("combinatorial", ["--max-remove", "2"], ["--max-remove", "3"], "--max-remove 2, this run has 3;"),
    ("sequential", [], ["--unit", "attn"], "--unit block, this run has attn;"),
    ("custom", ["--remove", "1,3"], ["--remove", "1,attn3"], "--remove 1,3, this run has 1,attn3;"),
])
def test_resume_refuses_other_selection_options(mode, first, then, message, model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert kit(model_dir, text_file, "--mode", mode, *FAST, *first, out=out) == 0
    path = only_csv(out)
    line = refused(model_dir, text_file, capsys, "--mode", mode, *FAST, *then, "--resume", str(path))
    assert message in line


def test_resume_ignores_speed_settings_when_nothing_is_timed(started, text_file):
    path, model = started
    assert kit(model, text_file, "--mode", "sequential", *FAST, "--speed-runs", "3", "--resume", str(path)) == 0


def test_resume_names_a_changed_speed_setting_with_readable_values(model_dir, text_file, tmp_path, capsys):
    timed = ["--max-tokens", "200", "--max-length", "64", "--quiet", "--speed-warmup", "0", "--gen-tokens", "2"]
    out = tmp_path / "out"
    assert kit(model_dir, text_file, "--mode", "custom", "--remove", "1", *timed, "--speed-runs", "2", out=out) == 0
    path = only_csv(out)
    line = refused(model_dir, text_file, capsys, "--mode", "custom", "--remove", "1", *timed, "--speed-runs", "3",
                   "--resume", str(path))
    assert "was made with --speed-runs 2, this run has 3;" in line and "{" not in line


def test_resume_names_the_protocol_not_the_stride(started, text_file, capsys):
    path, model = started
    line = refused(model, text_file, capsys, "--mode", "sequential", *FAST, "--protocol", "disjoint",
                   "--resume", str(path))
    assert "was made with --protocol sliding, this run has disjoint;" in line


def test_resume_of_a_file_with_a_byte_that_is_not_utf8_is_one_line(started, text_file, capsys):
    path, model = started
    data = path.read_bytes()
    cut = data.rfind(b"sequential")
    path.write_bytes(data[:cut] + b"\xff" + data[cut + 1:])
    line = refused(model, text_file, capsys, "--mode", "sequential", *FAST, "--resume", str(path))
    assert f"'{path}' is not a UTF-8 results file" in line


def test_sidecar_counts_the_rows_of_a_killed_run(model_dir, text_file, tmp_path, monkeypatch):
    """kill -9 leaves no chance to save at the end: the sidecar must already count every row written."""
    from reporting import csvfile

    class Killed(BaseException):
        pass

    real, calls = csvfile.ResultsFile.write, []

    def killed_at_the_fourth_row(self, row):
        calls.append(row)
        if len(calls) == 4:
            raise Killed
        real(self, row)

    monkeypatch.setattr(csvfile.ResultsFile, "write", killed_at_the_fourth_row)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        kit(model_dir, text_file, "--mode", "sequential", *FAST, out=out)
    path = only_csv(out)
    rows = read_rows(str(path))
    record = read_sidecar(str(path))
    assert len(rows) == 3
    assert record["configurations_evaluated"] == 3
    assert record["tokens_evaluated"] == sum(r["eval_tokens"] for r in rows)


# ---- one line instead of a traceback -----------------------------------------------------------

def test_a_tokenizer_larger_than_the_embeddings_is_refused_before_any_work(tokenizer, text_file, tmp_path, capsys):
    small = save_model_dir(tmp_path / "small", make_model(n_layer=2, vocab_size=100), tokenizer)
    out = tmp_path / "out"
    line = refused(small, text_file, capsys, "--mode", "sequential", *FAST, "--save_results", "--output-dir", str(out))
    assert "token id" in line and "embeddings for ids 0..99 only" in line
    ids = tokenizer(Path(text_file).read_text())["input_ids"][:400]
    assert f"token id {max(ids)}" in line  # the largest id of the evaluated text, as the tokenizer gives it
    assert not out.exists()  # no header-only CSV left behind


def test_a_full_disk_while_writing_a_figure_keeps_the_report(model_dir, text_file, tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    real, calls = Figure.savefig, []

    def full_at_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", full_at_the_second)
    out = tmp_path / "out"
    # single removals, two depths and pairs: three figures
    assert kit(model_dir, text_file, "--mode", "combinatorial", "--min-remove", "1", "--max-remove", "2", *FAST,
               "--plot", "--output-dir", str(out)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: cannot write the figure") and "No space left" in err
    report = next(out.glob("*_report.md")).read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 1 and f"({pngs[0]})" in report and report.count(".png)") == 1
    assert not list(out.glob(".*.tmp"))


def test_a_full_disk_during_save_model_is_one_line(model_dir, text_file, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", full)
    target = tmp_path / "pruned"
    assert kit(model_dir, text_file, "--mode", "custom", "--remove", "1", *FAST, "--save-model", str(target)) == 1
    line = one_error_line(capsys)
    assert f"cannot write the pruned model to '{target}'" in line and "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no target, no partial folder


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickled_checkpoint_that_runs_code_is_refused_in_one_line(model_dir, text_file, tmp_path, capsys):
    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil)
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"transformer.wte.weight": Payload(str(marker))}, evil / "pytorch_model.bin")
    line = refused(evil, text_file, capsys, "--mode", "baseline", *FAST)
    assert line.startswith(f"error: cannot load model '{evil}': its pickled weights hold more than tensors")
    assert "posix.mkdir" in line and "weights_only" not in line
    assert not marker.exists()


# ---- accepted silently before ------------------------------------------------------------------

@pytest.mark.parametrize("n_layer, kind", [(N_LAYER + 2, "lacks"), (N_LAYER - 1, "has no place for")])
def test_a_config_that_does_not_match_the_weights_is_refused(n_layer, kind, model_dir, text_file, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(model_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["n_layer"] = n_layer
    (odd / "config.json").write_text(json.dumps(config))
    line = refused(odd, text_file, capsys, "--mode", "baseline", *FAST)
    assert f"model '{odd}' does not match its config.json" in line and kind in line
    assert f"h.{N_LAYER if n_layer > N_LAYER else N_LAYER - 1}." in line


def test_a_nan_weight_is_refused(model_dir, text_file, tokenizer, tmp_path, capsys):
    model = make_model(n_layer=N_LAYER, vocab_size=len(tokenizer))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = float("nan")
    broken = save_model_dir(tmp_path / "nan", model, tokenizer)
    line = refused(broken, text_file, capsys, "--mode", "sequential", *FAST, "--save_results", "--output-dir",
                   str(tmp_path / "out"))
    assert "NaN or infinite values in its weight transformer.h.0.mlp.c_fc.weight" in line
    assert not (tmp_path / "out").exists()


def test_a_baseline_whose_perplexity_is_not_finite_is_refused(tokenizer, text_file, tmp_path, capsys):
    model = make_model(n_layer=N_LAYER, vocab_size=len(tokenizer))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e37)  # finite weights whose activations overflow float32
    huge = save_model_dir(tmp_path / "huge", model, tokenizer)
    out = tmp_path / "out"
    line = refused(huge, text_file, capsys, "--mode", "sequential", *FAST, "--save_results", "--output-dir", str(out))
    assert "the unpruned model's perplexity is nan" in line
    assert not out.exists()


def test_a_nan_row_is_named_neither_most_nor_least_harmful():
    from reporting.tables import observations

    def row(removed, ppl):
        return {"removed_layers": removed, "perplexity": ppl, "ppl_change_pct": (ppl / 100 - 1) * 100}

    rows = [row([], 100.0), row([0], math.nan), row([1], 120.0), row([2], 101.0)]
    notes = observations(rows)
    assert notes[0].startswith("Most harmful: removing block 1 ")
    assert notes[1].startswith("Least harmful: removing block 2 ")
    assert not any("block 0" in n for n in notes)
    from reporting.markdown import best_per_depth

    assert [r["removed_layers"] for r in best_per_depth(rows)] == [[2]]


def test_text_column_with_a_plain_text_file_is_refused(model_dir, text_file, capsys):
    with pytest.raises(SystemExit) as exit_:
        kit(model_dir, text_file, "--mode", "baseline", *FAST, "--text-column", "body")
    assert exit_.value.code == 2
    line = one_error_line(capsys)
    assert "--text-column" in line and "is plain text" in line


@pytest.mark.parametrize("budget, message", [
    ("2.0", "is neither a fraction in (0, 1)"),
    ("1.0", "is neither a fraction in (0, 1)"),
    ("2", "asks for 2 parameters"),
    ("0.5K", "asks for 500 parameters"),
])
def test_target_params_that_is_neither_a_fraction_nor_a_count_is_refused(budget, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(["--mode", "importance", "--target-params", budget])
    assert exit_.value.code == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize("budget", ["0.8", "60M", "50000", "1.5K"])
def test_fractions_and_counts_are_still_accepted(budget):
    from runner.options import params_budgets

    assert params_budgets(budget) == budget


# ---- --save-model: stale partial folders, links ------------------------------------------------

def test_a_partial_folder_of_a_killed_save_is_removed_at_the_next_run(model_dir, text_file, tmp_path, capsys):
    from export.checkpoint import STAGING_LOCK

    target = tmp_path / "pruned"
    killed, writing, older = (tmp_path / f".pruned.partial-{n}" for n in ("killed", "writing", "older"))
    for folder in (killed, writing, older):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (killed / STAGING_LOCK).touch()  # its writer is gone: nobody holds the lock
    (writing / STAGING_LOCK).touch()
    with open(writing / STAGING_LOCK, "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a run still writing it
        assert kit(model_dir, text_file, "--mode", "custom", "--remove", "1", *FAST, "--save-model", str(target)) == 0
    err = capsys.readouterr().err
    assert not killed.exists() and f"Removed '{killed}'" in err
    assert writing.exists() and str(writing) not in err
    assert older.exists() and f"'{older}' is a partial --save-model folder" in err
    assert (target / "model.safetensors").is_file() and not (target / STAGING_LOCK).exists()


@pytest.mark.parametrize("points_to", ["missing", "empty folder"])
def test_save_model_at_a_link_is_refused_before_any_work(points_to, model_dir, text_file, tmp_path, capsys,
                                                          monkeypatch):
    no_model_loading(monkeypatch)
    where = tmp_path / "elsewhere"
    if points_to == "empty folder":
        where.mkdir()
    link = tmp_path / "pruned"
    link.symlink_to(where)
    line = refused(model_dir, text_file, capsys, "--mode", "custom", "--remove", "1", *FAST, "--save-model", str(link))
    assert f"--save-model '{link}' is a symbolic link" in line
    assert ("does not exist" in line) == (points_to == "missing")


# ---- security ----------------------------------------------------------------------------------

def test_a_task_yaml_that_runs_python_needs_trust_remote_code(model_dir, text_file, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\ndef process(doc): return doc\n")
    (tasks / "sneaky.yaml").write_text("task: sneaky\ndataset_path: json\nprocess_docs: !function utils.process\n")
    line = refused(model_dir, text_file, capsys, "--mode", "baseline", *FAST, "--tasks", "sneaky",
                   "--include-path", str(tasks))
    assert f"'{tasks / 'sneaky.yaml'}' runs Python from the folder (!function)" in line
    assert "--trust-remote-code" in line
    assert not (tmp_path / "ran").exists()
    from runner.options import BY_DEST, help_text

    help_line = help_text(BY_DEST["include_path"])
    assert "!function" in help_line and "--trust-remote-code" in help_line


def test_report_replaces_planted_links_instead_of_writing_through_them(started, tmp_path):
    path, _ = started
    victims = {}
    for kind in ("_report.md", "_per-block.png"):
        victim = tmp_path / f"victim{kind}"
        victim.write_text("precious")
        planted = Path(str(path)[: -len(".csv")] + kind)
        planted.unlink(missing_ok=True)
        planted.symlink_to(victim)
        victims[planted] = victim
    assert main.main(["--mode", "report", "--input", str(path)]) == 0
    for planted, victim in victims.items():
        assert victim.read_text() == "precious"
        assert planted.is_file() and not planted.is_symlink() and planted.stat().st_size > 100
    assert oct(next(iter(victims)).stat().st_mode & 0o777) != oct(0o600)  # readable as a normal file is


# ---- the run says what it will do --------------------------------------------------------------

def test_the_default_window_of_a_long_context_model_is_capped_at_4096(tokenizer, text_file, tmp_path, capsys):
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=8192, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    long = save_model_dir(tmp_path / "long", GPT2LMHeadModel(config), tokenizer)
    out = tmp_path / "out"
    assert kit(long, text_file, "--mode", "baseline", *quick(300), out=out) == 0
    err = capsys.readouterr().err
    record = read_sidecar(str(only_csv(out)))
    assert record["max_length"] == 4096 and record["max_length_source"] == "the model's context capped at 4096"
    assert "Windows of 4,096 tokens: the model's context is 8,192" in err
    assert "All 300 tokens fit in one window of up to 4,096" in err and "in 1 window (" in err


def test_the_default_window_of_a_short_context_model_is_its_context(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert kit(model_dir, text_file, "--mode", "baseline", *quick(300), out=out) == 0
    record = read_sidecar(str(only_csv(out)))
    assert record["max_length"] == 128 and record["max_length_source"] == "the model's context"
    assert "Windows of" not in capsys.readouterr().err


def fake_estimates(monkeypatch, *seconds: float) -> list:
    import runner.evaluate

    calls = []

    def estimate(model, ids, removals, windows):
        calls.append(list(removals))
        return seconds[min(len(calls), len(seconds)) - 1], 1.5

    monkeypatch.setattr(runner.evaluate, "estimated_seconds", estimate)
    return calls


def test_the_cpu_hint_retimes_a_slow_first_batch(model_dir, text_file, capsys, monkeypatch):
    calls = fake_estimates(monkeypatch, 1440.0, 40.0)  # the first forward paid for warm-up
    assert kit(model_dir, text_file, "--mode", "sequential", *quick(400, "--max-length", "64")) == 0
    assert len(calls) == 2 and "On a CPU this is slow" not in capsys.readouterr().err


def test_the_cpu_hint_suggests_fewer_tokens_than_were_given(model_dir, text_file, capsys, monkeypatch):
    fake_estimates(monkeypatch, 1440.0)
    assert kit(model_dir, text_file, "--mode", "sequential", *quick(400, "--max-length", "64")) == 0
    err = capsys.readouterr().err
    # half of 600 s at 1440 s per 400 tokens: 83 tokens (two significant digits)
    assert "about 24 minutes of perplexity passes for 5 configurations" in err
    assert "--max-tokens 83 (about 5 minutes of passes) gives a quick estimate" in err


def test_the_cpu_hint_estimates_only_what_a_resume_has_left(started, text_file, capsys, monkeypatch):
    path, model = started
    calls = fake_estimates(monkeypatch, 1440.0)
    rows = path.read_text().splitlines(keepends=True)
    path.write_text("".join(rows[:-2]))  # the last two configurations are left
    assert kit(model, text_file, "--mode", "sequential", *quick(400, "--max-length", "64"), "--resume", str(path)) == 0
    assert [len(c) for c in calls] == [2, 2]
    assert "for 2 configurations" in capsys.readouterr().err
    calls.clear()
    assert kit(model, text_file, "--mode", "sequential", *quick(400, "--max-length", "64"), "--resume", str(path)) == 0
    assert calls == [] and "Nothing left to evaluate" in capsys.readouterr().err


def test_quiet_without_save_results_warns(model_dir, text_file, capsys):
    assert kit(model_dir, text_file, "--mode", "baseline", *quick(200), "--quiet") == 0
    assert "--quiet without --save_results prints no results and keeps no file" in capsys.readouterr().err


def test_plurals():
    from utils.text import minutes, plural

    assert (plural(1, "window"), plural(1308, "window")) == ("1 window", "1,308 windows")
    assert (minutes(20), minutes(70), minutes(1440)) == ("under a minute", "about 1 minute", "about 24 minutes")


def test_block_labels_of_a_30_block_figure_do_not_run_together():
    from reporting.figures import per_block_figure

    rows = [{"removed_layers": [], "perplexity": 10.0, "ppl_change_pct": 0.0, "model": "m"}]
    rows += [{"removed_layers": [b], "perplexity": 10.0 + b, "ppl_change_pct": 10.0 * b, "speed_change_pct": -3.0,
              "model": "m"} for b in range(30)]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = per_block_figure(rows)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        shown = [t for t in ax.get_xticklabels() if t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in shown]
        assert len(shown) >= 8 and "0" in [t.get_text() for t in shown]
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in shown]


# ---- generative tasks through --tasks ----------------------------------------------------------

GEN_TASK = "tiny_gen"
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
QUESTIONS = [f"{SUBJECTS[i].capitalize()} {VERBS[i]}" for i in range(8)]


@torch.no_grad()
def greedy_answers(model_dir: Path, removed: tuple[int, ...]) -> list[str]:
    """Each question's greedy continuation (5 tokens, cut at '.') under the model without ``removed``."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.transformer.h = nn.ModuleList(b for i, b in enumerate(model.transformer.h) if i not in removed)
    answers = []
    for q in QUESTIONS:
        ids = torch.tensor([tok(q)["input_ids"]])
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False,
                             attention_mask=torch.ones_like(ids))
        answers.append(tok.decode(out[0, ids.shape[1]:]).split(".")[0])
    return answers


@pytest.mark.slow
def test_a_generative_task_is_scored_by_exact_match_for_every_configuration(model_dir, text_file, tmp_path):
    """Targets: the unpruned model's own greedy answers for even questions, an impossible one for odd: the
    baseline scores 1/2, and each pruned configuration the share its own greedy answers match."""
    base = greedy_answers(model_dir, ())
    targets = [a if i % 2 == 0 else "\u2603 never" for i, a in enumerate(base)]
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "gen.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": t}) + "\n" for q, t in zip(QUESTIONS, targets)))
    (folder / "gen.yaml").write_text(GEN_YAML.format(data=data))
    out = tmp_path / "out"
    assert kit(model_dir, text_file, "--mode", "sequential", *FAST, "--tasks", GEN_TASK, "--include-path", str(folder),
               out=out) == 0
    rows = {tuple(r["removed_layers"]): r for r in read_rows(str(only_csv(out)))}
    assert len(rows) == N_LAYER + 1
    column = f"task:{GEN_TASK}:exact_match"
    for removed, row in rows.items():
        answers = base if not removed else greedy_answers(model_dir, removed)
        expected = sum(a == t for a, t in zip(answers, targets)) / len(targets)
        assert row[column] == pytest.approx(expected), removed
        assert row[f"task:{GEN_TASK}:n"] == len(QUESTIONS)
    assert rows[()][column] == 0.5
    assert any(row[column] != 0.5 for row in rows.values())  # removing a block changes some answers
    assert rows[(0,)][f"{column}_change_pts"] == pytest.approx((rows[(0,)][column] - 0.5) * 100)
    report = next(out.glob("*_report.md")).read_text()
    assert f"{GEN_TASK} exact_match (%)" in report and "50.00" in report
