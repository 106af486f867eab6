"""The speed test generates a fixed number of tokens, whatever the model says."""

from types import SimpleNamespace

import pytest
import torch

from evaluation import latency
from evaluation.latency import measure_latency


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
