"""GPU check in one command: the kit's sweep on a GPU, in the numbers a paper needs.

Builds a distilgpt2-shaped and a Llama-shaped model with random weights and,
for bfloat16 and float16 and window batches of 1 and 8, runs a sequential
sweep (the baseline and every single block removed) over WIKITEXT2_TOKENS
random token ids (the size of WikiText-2's test split under GPT-2's
tokenizer), windows of 1024 every 512, as runner/evaluate.py runs it. Per case
it prints the wall time, tokens scored per second, the model FLOP rate
(evaluation.engine.Work: PaLM's count) as a share of the GPU's dense peak for
that dtype, the peak memory, and the kit against one-model-at-a-time
(evaluation.sweep.measure, the reference the engine is tested against), timed
on the first SUBSET_TOKENS tokens only, since evaluating every configuration
alone over the whole stream would not fit the time budget; both paths'
perplexities on that subset are compared. Then the latency columns of the
baseline and one pruned configuration of each shape, in bfloat16.

    python benchmarks/gpu_check.py            # about 3-6 minutes on an H100-class GPU (estimate)

Without a CUDA GPU it says so and exits 0. Not part of the test suite's
measurements; see README.md, "Performance".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import SpeedSpec, WindowSpec  # noqa: E402
from evaluation.engine import Work  # noqa: E402
from evaluation.sweep import EvalSettings, measure, measure_all  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

WIKITEXT2_TOKENS = 287_000
SUBSET_TOKENS = 32_768
MAX_LENGTH, STRIDE = 1024, 512
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
BATCH_SIZES = (1, 8)
DEVICE = "cuda"
# Dense (no sparsity) tensor-core peak for bfloat16 and float16, TFLOP/s, from NVIDIA's data sheets.
# Matched against torch.cuda.get_device_name in order, so the more specific names come first.
DENSE_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
]


def distilgpt2_shape() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257))


def llama_shape() -> torch.nn.Module:
    """16 blocks of TinyLlama's width: 2048 wide, 32 query heads sharing 4 key-value heads, SwiGLU 5632, rotary."""
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=16, hidden_size=2048, intermediate_size=5632,
                                        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                        max_position_embeddings=2048))


SHAPES = {"distilgpt2 shape (6 x 768)": distilgpt2_shape, "Llama shape (16 x 2048, GQA 32/4)": llama_shape}


def dense_peak(name: str) -> float | None:
    """FLOP/s of the GPU's dense bfloat16/float16 peak, None for a GPU not in the table."""
    return next((tflops * 1e12 for key, tflops in DENSE_PEAK_TFLOPS if key in name), None)


def summed(measurements) -> Work:
    total = Work()
    for m in measurements:
        if m.work is not None:
            total.add(m.work)
    return total


def sweep(model, ids, batch_size: int) -> tuple[list, float]:
    """The kit's sequential sweep, baseline included, and its wall time."""
    removals = [()] + [(i,) for i in range(model.config.num_hidden_layers)]
    settings = EvalSettings(WindowSpec(MAX_LENGTH, STRIDE, batch_size), progress=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    rows = list(measure_all(model, ids, None, removals, settings))
    torch.cuda.synchronize()
    return rows, time.perf_counter() - start


def one_at_a_time(model, ids, batch_size: int) -> tuple[list, float]:
    removals = [()] + [(i,) for i in range(model.config.num_hidden_layers)]
    settings = EvalSettings(WindowSpec(MAX_LENGTH, STRIDE, batch_size), progress=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    rows = [measure(model, ids, None, r, settings) for r in removals]
    torch.cuda.synchronize()
    return rows, time.perf_counter() - start


def run_case(model, ids, dtype_name: str, batch_size: int, peak: float | None) -> None:
    torch.cuda.reset_peak_memory_stats()
    rows, seconds = sweep(model, ids, batch_size)
    work = summed(rows)
    memory_gb = torch.cuda.max_memory_allocated() / 1e9
    share = f"{work.flops_per_s / peak:.0%}" if peak else "unknown"
    subset = ids[:SUBSET_TOKENS]
    kit_rows, kit_s = sweep(model, subset, batch_size)
    alone_rows, alone_s = one_at_a_time(model, subset, batch_size)
    worst = max(abs(a.ppl.perplexity - b.ppl.perplexity) / b.ppl.perplexity for a, b in zip(kit_rows, alone_rows))
    print(f"| {dtype_name} | {batch_size} | {len(rows)} | {seconds:.1f} s | {work.tokens_scored / seconds:,.0f} | "
          f"{work.flops_per_s / 1e12:.1f} TFLOP/s = {share} | {alone_s / kit_s:.2f}x ({alone_s:.1f} / {kit_s:.1f} s; "
          f"largest PPL difference {worst:.1e}) | {memory_gb:.2f} GB |", flush=True)


def latency_columns(model, ids) -> None:
    """The results file's latency columns for the baseline and the last block removed."""
    prompt = ids[:8]
    last = model.config.num_hidden_layers - 1
    settings = EvalSettings(WindowSpec(MAX_LENGTH, STRIDE, 1), SpeedSpec(enabled=True), progress=False)
    for m in measure_all(model, ids[:2 * MAX_LENGTH], prompt, [(), (last,)], settings):
        lat = m.latency
        print(f"| {list(m.removed)} | {lat.latency_ms:.2f} | {lat.latency_iqr_ms:.2f} | {lat.prefill_ms:.2f} | "
              f"{lat.tokens_per_s:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=WIKITEXT2_TOKENS, help="tokens per sweep (default: 287,000)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU: nothing measured (this check needs one).")
        return 0
    hf_logging.set_verbosity_error()
    name = torch.cuda.get_device_name()
    peak = dense_peak(name)
    started = time.perf_counter()
    print(f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; dense bf16/fp16 peak used: "
          + (f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown for this GPU (share not computed)"))
    print(f"Sequential sweeps over {args.tokens:,} random token ids, windows of {MAX_LENGTH} every {STRIDE}; "
          f"kit against one-model-at-a-time on the first {SUBSET_TOKENS:,} tokens only.")
    for shape, build in SHAPES.items():
        torch.manual_seed(0)
        base = build().eval()
        ids = torch.randint(0, base.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(1))
        print(f"\n{shape}\n\n| dtype | batch | configs | wall | tokens scored/s | model FLOP/s (share of peak) | "
              "kit vs one-at-a-time (subset) | peak memory |\n|---|---|---|---|---|---|---|---|")
        for dtype_name, dtype in DTYPES.items():
            model = base.to(DEVICE, dtype)
            for batch_size in BATCH_SIZES:
                run_case(model, ids, dtype_name, batch_size, peak)
        model = base.to(DEVICE, torch.bfloat16)
        print("\nLatency columns (bfloat16, 64 generated tokens, median of 10):\n\n"
              "| removed | latency_ms | latency_iqr_ms | prefill_ms | tokens_per_s |\n|---|---|---|---|---|")
        latency_columns(model, ids)
        del model, base
        torch.cuda.empty_cache()
    print(f"\nTotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
