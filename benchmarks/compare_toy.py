"""Build an offline toy for --mode compare: a 6-block GPT-2 (64 dims) trained
briefly on the tests' generated text, saved with that text.

No real checkpoint is reachable offline, so this only shows how the rules
behave on a small trained model; it says nothing about distilgpt2.

    python benchmarks/compare_toy.py /tmp/toy
    python main.py --mode compare --model /tmp/toy/model --dataset /tmp/toy/text.txt \
        --max-tokens 20000 --calib-tokens 16384 --no-speed --save_results --output-dir /tmp/toy/results
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import make_model, make_text, make_tokenizer, save_model_dir, train_briefly  # noqa: E402


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    text = make_text(3000, seed=1)
    tokenizer = make_tokenizer(text)
    (out / "text.txt").write_text(text, encoding="utf-8")
    ids = torch.tensor(tokenizer(text)["input_ids"])
    model = make_model(n_layer=6, n_embd=64, n_head=4, vocab_size=len(tokenizer))
    train_briefly(model, ids, steps=300)
    save_model_dir(out / "model", model, tokenizer)
    print(f"{len(ids):,} tokens in {out / 'text.txt'}; model in {out / 'model'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/toy")
