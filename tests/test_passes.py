"""Results passes: checkpoints that continue a stopped pass to the same bits, the FLOP progress bar,
perplexity intervals checked on simulated text, and KL / top-1 agreement against an independent
computation."""

import copy
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import main
from conftest import IDENTITY_BLOCK, N_LAYER, ROOT
from evaluation import engine, passfile
from evaluation.engine import KILL_AFTER_WINDOWS, run_pass
from evaluation.intervals import block_counts, block_tokens, perplexity_intervals
from evaluation.passfile import PassCheckpoint
from evaluation.perplexity import window_ids
from evaluation.windows import make_windows, window_batches
from reporting import csvfile
from reporting.schema import COLUMNS, EARLIER_COLUMNS
from reporting.tables import PPL_NOISE_NOTE, observations, sweep_table
from utils.errors import KitError

MAX_LENGTH, STRIDE = 48, 20
SEQUENTIAL = [()] + [(i,) for i in range(N_LAYER)]


@pytest.fixture(scope="module")
def ids(tokenizer, text):
    return torch.tensor(tokenizer(text)["input_ids"][:900])


def full_pass(model, ids, removals=SEQUENTIAL, checkpoint=None, batch_size=1):
    return run_pass(model, ids, removals, MAX_LENGTH, STRIDE, batch_size, progress=False, compare=True,
                    divergence=True, checkpoint=checkpoint)


# ---- KL divergence and top-1 agreement --------------------------------------------------------

@torch.no_grad()
def independent_divergence(model, ids, removed: int) -> tuple[float, float]:
    """Mean KL(original || pruned) and top-1 agreement from a copy with the block deleted, full forwards in
    float64 log-softmax, at the scored positions of the same windows."""
    pruned = copy.deepcopy(model)
    del pruned.transformer.h[removed]
    pruned.config.n_layer -= 1
    kl, agree, n = 0.0, 0, 0
    for w in make_windows(len(ids), MAX_LENGTH, STRIDE):
        inputs = window_ids(ids, w).unsqueeze(0)
        first = w.position(w.first_target)
        at = slice(first, first + w.scored)
        p = model(input_ids=inputs, use_cache=False).logits[0, at].double().log_softmax(-1)
        q = pruned(input_ids=inputs, use_cache=False).logits[0, at].double().log_softmax(-1)
        kl += (p.exp() * (p - q)).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        n += w.scored
    return kl / n, agree / n


def test_kl_and_top1_agreement_match_a_model_with_the_block_deleted(model, ids):
    results, _ = full_pass(model, ids)
    by_removal = dict(zip(SEQUENTIAL, results))
    assert by_removal[()].kld == 0.0 and by_removal[()].top1_agreement == 1.0
    # the identity block changes no logit: exactly no divergence
    assert by_removal[(IDENTITY_BLOCK,)].kld == 0.0 and by_removal[(IDENTITY_BLOCK,)].top1_agreement == 1.0
    for block in (0, 3):
        kl, agree = independent_divergence(model, ids, block)
        # float32 sums of p log p and p log q: about 1e-7 nats per position apart from float64 (this random
        # model's KL is only 2e-4 nats)
        assert kl > 0 and by_removal[(block,)].kld == pytest.approx(kl, rel=1e-3, abs=1e-7)
        assert by_removal[(block,)].top1_agreement == pytest.approx(agree, abs=1 / 2000)


def test_a_group_without_the_baseline_still_compares_against_it(model, ids):
    alone, _ = full_pass(model, ids, [(0,), (3,)])
    together, _ = full_pass(model, ids)
    assert alone == [together[1], together[4]]


# ---- checkpoints ------------------------------------------------------------------------------

class Stop(Exception):
    pass


def stop_after(monkeypatch, windows: int):
    def hook(done):
        if done >= windows:
            raise Stop

    monkeypatch.setattr(engine, "_test_kill", hook)


def test_a_stopped_pass_continues_from_its_checkpoint_to_the_same_bits(model, ids, tmp_path, monkeypatch):
    want, whole = full_pass(model, ids, batch_size=2)
    n_windows = len(make_windows(len(ids), MAX_LENGTH, STRIDE))
    checkpoint = PassCheckpoint(str(tmp_path / "run.pass.pt"))
    stop_after(monkeypatch, n_windows // 2 + 1)
    with pytest.raises(Stop):
        full_pass(model, ids, checkpoint=checkpoint, batch_size=2)
    saved = checkpoint.read()
    assert 0 < saved.done < n_windows // 2 + 3 and not saved.complete  # batches of 2
    monkeypatch.undo()
    got, rest = full_pass(model, ids, checkpoint=PassCheckpoint(checkpoint.path), batch_size=2)
    assert got == want  # perplexities, intervals, KL and agreement, to the last bit
    assert rest.block_evals == whole.block_evals * (n_windows - saved.done) // n_windows
    # a finished pass stays saved until its rows are written, and gives its results without work
    again, none = full_pass(model, ids, checkpoint=PassCheckpoint(checkpoint.path), batch_size=2)
    assert again == want and none.block_evals == 0


def test_checkpoints_are_written_every_five_percent_of_the_windows(model, ids, tmp_path, monkeypatch):
    saves = []
    real = PassCheckpoint.save
    monkeypatch.setattr(PassCheckpoint, "save", lambda self, state: saves.append(state.done) or real(self, state))
    full_pass(model, ids, checkpoint=PassCheckpoint(str(tmp_path / "p.pt")))
    n = len(make_windows(len(ids), MAX_LENGTH, STRIDE))
    step = -(-n // 20)
    assert saves == [*range(step, n + 1, step), n]  # every 5%, and once more when it ends


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 1}, "batch_size 2, this run has 1"),
    ({"removals": [(), (0,), (1,)]}, "configurations"),
    ({"ids": "shorter"}, "was made with windows"),
])
def test_a_checkpoint_of_another_pass_is_refused_naming_what_differs(change, message, model, ids, tmp_path,
                                                                     monkeypatch):
    path = str(tmp_path / "p.pt")
    stop_after(monkeypatch, 10)
    with pytest.raises(Stop):
        full_pass(model, ids, checkpoint=PassCheckpoint(path), batch_size=2)
    monkeypatch.undo()
    kwargs = {"removals": SEQUENTIAL, "batch_size": 2, "ids": ids, **change}
    if kwargs["ids"] == "shorter":
        kwargs["ids"] = ids[:-40]
    with pytest.raises(KitError, match=message):
        full_pass(model, kwargs["ids"], kwargs["removals"], PassCheckpoint(path), kwargs["batch_size"])


def test_the_progress_bar_counts_flops_block_by_block(model, ids, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.updates, self.done = total, 0, 0.0
            bars.append(self)

        def update(self, n):
            self.updates, self.done = self.updates + 1, self.done + n

        def set_postfix_str(self, *a, **k):
            pass

        def close(self):
            pass

    monkeypatch.setattr(engine, "progress_bar", Bar)
    _, work = run_pass(model, ids, SEQUENTIAL, MAX_LENGTH, STRIDE, 4, compare=True)
    [bar] = bars
    assert bar.total == pytest.approx(work.flops) and bar.done == pytest.approx(work.flops)
    # one update per block evaluation and per configuration's head, not one per window batch
    batches = len(list(window_batches(make_windows(len(ids), MAX_LENGTH, STRIDE), 4)))
    nodes = work.block_evals // work.windows
    assert bar.updates == batches * (nodes + len(SEQUENTIAL))


# ---- intervals --------------------------------------------------------------------------------

def ar_streams(sims: int, tokens: int, phi: float = 0.9, mean: float = 3.0, seed: int = 1) -> torch.Tensor:
    """Per-token NLL of simulated text: mean + AR(1) noise of unit variance (correlated over ~20 tokens)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(sims, tokens, generator=g, dtype=torch.float64)
    out = torch.empty_like(noise)
    out[:, 0] = noise[:, 0]
    for t in range(1, tokens):
        out[:, t] = phi * out[:, t - 1] + (1 - phi * phi) ** 0.5 * noise[:, t]
    return mean + out


def interval_of(stream: torch.Tensor, length: int, resamples: int = 2000) -> tuple[float, float]:
    counts = block_counts(len(stream), length)
    blocks = torch.zeros(len(counts), dtype=torch.float64).index_add_(
        0, torch.arange(len(stream)) // length, stream)
    return perplexity_intervals(blocks.unsqueeze(0), counts, None, resamples)[0][0]


def test_the_interval_covers_the_truth_at_95_and_a_disjoint_half_at_83_percent():
    sims, half = 200, 8192
    streams = ar_streams(sims, 2 * half)
    length = block_tokens(half)
    truth = torch.tensor(3.0).exp().item()
    covers_truth = covers_other_half = 0
    for s in streams:
        low, high = interval_of(s[:half], length)
        covers_truth += low <= truth <= high
        covers_other_half += low <= s[half:].mean().exp().item() <= high
    # two independent estimates of equal variance: P(|Z| < 1.96 / sqrt 2) = 0.834
    assert 0.90 <= covers_truth / sims <= 0.99
    assert 0.75 <= covers_other_half / sims <= 0.91
    # resampling single tokens ignores their correlation: far too narrow
    single = sum(low <= truth <= high for low, high in (interval_of(s[:half], 1, 200) for s in streams[:40]))
    assert single / 40 < 0.6


def test_the_paired_change_interval_covers_the_true_change_and_is_narrower():
    sims, tokens, delta = 100, 8192, 0.01
    base = ar_streams(sims, tokens)
    g = torch.Generator().manual_seed(2)
    pruned = base + delta + 0.1 * torch.randn(sims, tokens, generator=g, dtype=torch.float64)
    length = block_tokens(tokens)
    counts = block_counts(tokens, length)
    block_of = torch.arange(tokens) // length
    truth = torch.tensor(delta).expm1().item() * 100
    covered = narrower = 0
    for b, p in zip(base, pruned):
        blocks = torch.zeros(2, len(counts), dtype=torch.float64)
        blocks[0].index_add_(0, block_of, b)
        blocks[1].index_add_(0, block_of, p)
        (ppl, _), (_, (low, high)) = perplexity_intervals(blocks, counts, 0)
        covered += low <= truth <= high
        narrower += (high - low) < (ppl[1] - ppl[0]) / b.mean().exp().item() * 100
    assert 0.88 <= covered / sims <= 1.0 and narrower == sims


def test_intervals_are_deterministic_and_need_two_blocks():
    stream = ar_streams(1, 2000)[0]
    assert interval_of(stream, 100) == interval_of(stream, 100)
    assert perplexity_intervals(torch.ones(2, 1), torch.ones(1), 0) == [(None, None)] * 2
    assert block_tokens(1_000_000) == 128 and block_tokens(200) == 10 and block_tokens(5) == 1


# ---- rows, tables and old files ---------------------------------------------------------------

def run_kit(model_dir, text_file, *args) -> int:
    return main.main(["--model", str(model_dir), "--dataset", str(text_file), "--max-tokens", "400",
                      "--max-length", "64", "--no-speed", "--quiet", *args])


def test_rows_carry_intervals_and_divergence_and_tables_mark_noise(model_dir, text_file, tmp_path):
    assert run_kit(model_dir, text_file, "--mode", "sequential", "--kl", "--save_results", "--output-dir",
                   str(tmp_path)) == 0
    [path] = tmp_path.glob("*.csv")
    rows = csvfile.read_rows(str(path))
    base, identity = rows[0], rows[1 + IDENTITY_BLOCK]
    assert base["ppl_low"] < base["perplexity"] < base["ppl_high"]
    assert base["ppl_change_low_pct"] is None and (base["kld"], base["top1_agreement"]) == (0, 1)
    assert (identity["ppl_change_low_pct"], identity["ppl_change_high_pct"], identity["kld"]) == (0, 0, 0)
    assert all(r["ppl_change_low_pct"] <= r["ppl_change_pct"] <= r["ppl_change_high_pct"] for r in rows[1:])
    assert not list(tmp_path.glob("*.pass.pt"))  # removed once the rows were written
    table = sweep_table(rows)
    assert PPL_NOISE_NOTE in table and "~+0.00" in table
    report = next(tmp_path.glob("*_report.md")).read_text()
    assert "PPL Change 95% Interval" in report and "KL (nats)" in report
    noisy = [{**r, "ppl_change_low_pct": -1.0, "ppl_change_high_pct": 1.0} for r in rows]
    assert "within the noise" in observations(noisy)[-1]


def test_without_kl_the_divergence_columns_are_empty(model_dir, text_file, tmp_path):
    assert run_kit(model_dir, text_file, "--mode", "custom", "--remove", "1", "--save_results",
                   "--output-dir", str(tmp_path)) == 0
    [path] = tmp_path.glob("*.csv")
    rows = csvfile.read_rows(str(path))
    assert all(r["kld"] is None and r["top1_agreement"] is None for r in rows)
    assert rows[1]["ppl_change_low_pct"] is not None


def test_a_file_of_the_earlier_columns_is_resumed_without_the_new_ones(model_dir, text_file, tmp_path):
    assert run_kit(model_dir, text_file, "--mode", "sequential", "--save_results", "--output-dir", str(tmp_path)) == 0
    [path] = tmp_path.glob("*.csv")
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == COLUMNS
    with open(path, "w", newline="") as f:  # as the version before the pass columns wrote it, last two rows unwritten
        csv.writer(f).writerows(row[: len(EARLIER_COLUMNS)] for row in table[:-2])
    assert run_kit(model_dir, text_file, "--mode", "sequential", "--resume", str(path)) == 0
    with open(path, newline="") as f:
        resumed = list(csv.reader(f))
    assert resumed[0] == EARLIER_COLUMNS and len(resumed) == len(table)
    assert [r[:6] for r in resumed] == [r[:6] for r in table]  # the same configurations, their rows whole


def test_an_interrupt_during_the_speed_tests_keeps_the_finished_pass(model_dir, text_file, tmp_path, monkeypatch,
                                                                     capsys):
    from evaluation import sweep

    args = ["--mode", "sequential", "--save_results"]
    assert run_kit(model_dir, text_file, *args, "--output-dir", str(tmp_path / "whole")) == 0
    [whole] = (tmp_path / "whole").glob("*.csv")
    real, calls = sweep.finish, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep, "finish", interrupted)
    assert run_kit(model_dir, text_file, *args, "--output-dir", str(tmp_path / "cut")) == 130
    [cut] = (tmp_path / "cut").glob("*.csv")
    assert len(csvfile.read_rows(str(cut))) == 2 and os.path.exists(csvfile.pass_checkpoint_path(str(cut)))
    monkeypatch.undo()
    capsys.readouterr()
    assert main.main(["--model", str(model_dir), "--dataset", str(text_file), "--max-tokens", "400",
                      "--max-length", "64", "--no-speed", "--mode", "sequential", "--resume", str(cut)]) == 0
    assert work_of(capsys.readouterr().err) == 0  # the rows came from the finished pass's checkpoint
    assert same_rows(whole, cut) and not os.path.exists(csvfile.pass_checkpoint_path(str(cut)))


def same_rows(a, b) -> bool:
    """Every cell but the timestamp equal, configuration by configuration."""
    def cells(path):
        return {r["removed_layers"]: {k: v for k, v in r.items() if k != "timestamp"}
                for r in csv.DictReader(open(path, newline=""))}
    return cells(a) == cells(b)


# ---- a run killed mid-pass --------------------------------------------------------------------

def work_of(err: str) -> int:
    line = next(x for x in err.splitlines() if x.startswith("Perplexity work:"))
    return int(line.split(": ")[2].split(" block")[0].replace(",", ""))


@pytest.mark.slow
def test_a_run_killed_mid_pass_resumes_to_the_same_rows_with_less_work(model_dir, text_file, tmp_path):
    def kit(*args, kill=None):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if kill:
            env[KILL_AFTER_WINDOWS] = str(kill)
        return subprocess.run([sys.executable, "main.py", "--mode", "sequential", "--model", str(model_dir),
                               "--dataset", str(text_file), "--max-tokens", "2400", "--max-length", "48",
                               "--stride", "24", "--batch-size", "2", "--kl", "--no-speed", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    whole = kit("--save_results", "--output-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    windows = len(make_windows(2400, 48, 24))
    killed = kit("--save_results", "--output-dir", str(tmp_path / "killed"), kill=windows // 2)
    assert killed.returncode == -9
    [path] = (tmp_path / "killed").glob("*.csv")
    checkpoint = csvfile.pass_checkpoint_path(str(path))
    assert os.path.exists(checkpoint) and not csvfile.read_rows(str(path))
    resumed = kit("--resume", str(path))
    assert resumed.returncode == 0, resumed.stderr
    [reference] = (tmp_path / "whole").glob("*.csv")
    assert same_rows(reference, path) and not os.path.exists(checkpoint)
    assert work_of(resumed.stderr) < 0.7 * work_of(whole.stderr)
    assert json.loads(path.with_suffix(".json").read_text())["work"]["block_evals"] == work_of(resumed.stderr)
