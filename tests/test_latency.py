"""The speed test generates a fixed number of tokens, whatever the model says."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch

import main
from config import WindowSpec
from evaluation import latency, sweep
from evaluation.latency import Latency, change_interval, measure_against_baseline, measure_latency, warn_if_noisy
from models.families import num_blocks
from models.removal import removed_blocks
from runner import evaluate


def always_eos(model):
    """Make every position's most likely next token the EOS token (id 0)."""
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[0] * 10)
    return model


def test_greedy_generation_would_stop_at_eos_without_the_fix(model):
    model = always_eos(model)
    prompt = torch.tensor([[5, 6, 7]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                         pad_token_id=0)
    assert out.shape[1] < 3 + 16  # the seed's way: generation ends at the first EOS


def test_latency_times_exactly_gen_tokens_new_tokens(model, monkeypatch):
    model = always_eos(model)
    lengths, real_generate = [], model.generate

    def counting_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    monkeypatch.setattr(model, "generate", counting_generate)
    result = measure_latency(model, torch.tensor([5, 6, 7]), gen_tokens=16, runs=5, warmup=2)
    assert lengths == [3 + 16] * 7  # 2 warm-up + 5 timed runs, each exactly 16 new tokens
    assert result.latency_ms > 0 and result.prefill_ms > 0 and result.latency_iqr_ms >= 0
    assert abs(result.tokens_per_s - 16 / (result.latency_ms / 1000)) < 1e-6


def test_latency_is_the_median_and_iqr_of_the_timed_runs(model, monkeypatch):
    # a clock under the test's control: each timed call takes the duration given here, warm-ups are not timed
    generate_ms, prefill_ms = [10.0, 20.0, 30.0, 40.0, 100.0], [1.0, 2.0, 3.0, 4.0, 5.0]
    ticks = iter([t for d in generate_ms + prefill_ms for t in (0.0, d / 1000)])
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    result = measure_latency(model, torch.tensor([5, 6, 7]), gen_tokens=4, runs=5, warmup=1)
    assert result.latency_ms == pytest.approx(30.0)
    assert result.latency_iqr_ms == pytest.approx(40.0 - 20.0)  # quartiles of the five runs, inclusive method
    assert result.prefill_ms == pytest.approx(3.0)
    assert result.tokens_per_s == pytest.approx(4 / 0.030)


class Clock:
    """perf_counter under the test's control: each timed call lasts ``duration(blocks, i)`` ms, where
    ``blocks`` is the model's depth when the call starts and ``i`` counts the timed calls before it."""

    def __init__(self, model, duration):
        self.model, self.duration, self.now, self.order, self.started = model, duration, 0.0, [], None

    def perf_counter(self):
        if self.started is None:  # a timed call starts
            self.started = num_blocks(self.model)
            self.order.append(self.started)
        else:  # ... and ends
            self.now += self.duration(self.started, len(self.order) - 1) / 1000
            self.started = None
        return self.now


def use_clock(monkeypatch, model, duration):
    clock = Clock(model, duration)
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    return clock


def test_pruned_runs_alternate_with_baseline_runs_each_pair_in_flipped_order(model, monkeypatch):
    full = num_blocks(model)
    clock = use_clock(monkeypatch, model, lambda blocks, i: 10.0)
    measure_against_baseline(model, [1], torch.tensor([5, 6, 7]), gen_tokens=2, runs=4, warmup=1)
    pairs = [full, full - 1, full - 1, full, full, full - 1, full - 1, full]
    assert clock.order == pairs + pairs  # generation runs, then prefill runs; warm-ups are not timed
    assert num_blocks(model) == full


NOISE = [0.0, 4.0, -4.0, 2.0, -2.0, 1.0, -1.0, 3.0, -3.0, 0.5]  # ms, one per run pair


def test_a_change_within_the_timing_noise_is_reported_as_such(model, monkeypatch):
    # both models take 100 ms give or take a few: the runs cannot tell them apart
    full = num_blocks(model)
    jitter = lambda blocks, i: NOISE[(i // 2 + (blocks != full) * 3) % 10]
    use_clock(monkeypatch, model, lambda blocks, i: 100.0 + jitter(blocks, i))
    result, change = measure_against_baseline(model, [1], torch.tensor([5, 6, 7]), gen_tokens=2, runs=10, warmup=0)
    assert change.low_pct < 0 < change.high_pct and change.within_noise
    assert change.change_pct == pytest.approx((result.latency_ms / change.baseline.latency_ms - 1) * 100)


def test_a_change_beyond_the_timing_noise_is_not(model, monkeypatch):
    # removing a block takes 20 ms off every run, far more than the few ms of jitter
    full = num_blocks(model)
    use_clock(monkeypatch, model, lambda blocks, i: (100.0 if blocks == full else 80.0) + NOISE[i // 2 % 10])
    _, change = measure_against_baseline(model, [1], torch.tensor([5, 6, 7]), gen_tokens=2, runs=10, warmup=0)
    assert change.change_pct == pytest.approx(-20.0, abs=2) and change.high_pct < 0 and not change.within_noise


def test_interleaving_cancels_a_machine_that_gets_quieter(model, monkeypatch):
    # the incident: the machine is twice as busy for the first 10 timed calls, then quiet
    full, prompt = num_blocks(model), torch.tensor([5, 6, 7])
    busy_then_quiet = lambda blocks, i: (100.0 if blocks == full else 83.0) * (2.0 if i < 10 else 1.0)
    use_clock(monkeypatch, model, busy_then_quiet)
    alone = measure_latency(model, prompt, gen_tokens=2, runs=10, warmup=0)  # timed calls 0-19, generation 0-9
    with removed_blocks(model, [1]) as pruned:
        after = measure_latency(pruned, prompt, gen_tokens=2, runs=10, warmup=0)  # 20-39: quiet
    assert (after.latency_ms / alone.latency_ms - 1) * 100 == pytest.approx(-58.5)  # one after the other: wrong
    use_clock(monkeypatch, model, busy_then_quiet)
    _, change = measure_against_baseline(model, [1], prompt, gen_tokens=2, runs=10, warmup=0)
    assert change.change_pct == pytest.approx(-17.0) and not change.within_noise  # interleaved: the model's own


def test_too_few_runs_bound_nothing():
    assert change_interval([100.0, 101.0, 99.0], [80.0, 81.0, 79.0])[1:] == (-math.inf, math.inf)


def test_a_wide_spread_is_warned_about(caplog):
    # the incident's numbers: a wide spread for the pruned model, a narrow one for the baseline
    pruned, baseline = Latency(742.0, 311.0, 10.0, 86.0), Latency(1561.0, 24.0, 10.0, 41.0)
    with caplog.at_level(logging.WARNING, logger="gpt2-pruning-kit"):
        warn_if_noisy("the baseline", baseline)  # 1.5%: quiet enough
        warn_if_noisy("removed blocks [3]", pruned, baseline)
    [record] = caplog.records
    assert "removed blocks [3] is noisy" in record.message and "311.00 ms, 42% of 742.00 ms" in record.message
    assert "24.00 ms, 2% of 1,561.00 ms" in record.message


def test_the_run_time_estimate_scales_the_first_window_batch_by_the_work(model, monkeypatch):
    ids, windows = torch.arange(256) % 300, WindowSpec(max_length=64, stride=64, batch_size=1)  # 4 windows of 64
    ticks = iter([0.0, 1.0, 0.0, 1.0])  # the first batch takes a second
    monkeypatch.setattr(sweep, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    baseline, batch = sweep.estimated_seconds(model, ids, [()], windows)
    assert batch == 1.0 and 3.9 < baseline <= 4.0  # 4 batches, the first window scoring one token less
    everything, _ = sweep.estimated_seconds(model, ids, [(), *[(b,) for b in range(num_blocks(model))]], windows)
    assert baseline < everything < (num_blocks(model) + 1) * baseline  # the sweep shares its prefixes


def test_the_speed_test_estimate_counts_every_timed_call(model, monkeypatch):
    """One generation plus one prefill took 0.5 s: the baseline's 10 runs and 2 warm-ups, then twice
    that for each of 3 pruned configurations (their runs alternate with the baseline's): 0.5 x 12 x 7."""
    ticks = iter([0.0, 0.5])
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert latency.estimated_speed_seconds(model, torch.arange(5), 4, 10, 2, 3) == 0.5 * 12 * 7


def test_the_cpu_hint_comes_from_the_estimate(model_dir, text_file, monkeypatch, capsys):
    argv = ["--mode", "baseline", "--model", str(model_dir), "--dataset", str(text_file), "--max-tokens", "300",
            "--no-speed"]
    assert main.main(argv) == 0
    assert "On a CPU this is slow" not in capsys.readouterr().err  # a tiny model: seconds, whatever the tokens
    monkeypatch.setattr(evaluate, "CPU_SLOW_SECONDS", 0.0)
    assert main.main(argv) == 0
    assert "On a CPU this is slow: under a minute of perplexity passes for 1 configuration (from a window batch" \
        in capsys.readouterr().err
    timed = [a for a in argv if a != "--no-speed"] + ["--speed-runs", "2", "--gen-tokens", "4"]
    assert main.main(timed) == 0
    err = capsys.readouterr().err
    assert "of speed tests (from one timed generation)" in err and "--no-speed" in err
