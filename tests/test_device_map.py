"""--device-map on CPU: blocks offloaded to disk by accelerate give the in-memory run's numbers exactly.

The tiny model is saved to disk and loaded with --max-memory so small that
its blocks and final norm go to disk (accelerate's AlignDevicesHook brings
their weights in for each call). The kit's engine calls blocks one by one and
slices the LM head's weight itself, so these are the paths that must see
real weights.
"""

from __future__ import annotations

import csv
import glob

import pytest
import torch
from transformers import AutoModelForCausalLM

import main
from evaluation.engine import sweep_perplexities
from models.loading import load_model
from models.placement import Placement, is_dispatched, parse_max_memory
from models.removal import removed_blocks
from utils.errors import KitError

MAX_MEMORY = "cpu=120KB"  # the embeddings fit, the 4 blocks do not


@pytest.fixture
def offloaded(model_dir, tmp_path):
    model, _ = load_model(str(model_dir), torch.device("cpu"), "float32",
                          placement=Placement("auto", MAX_MEMORY, str(tmp_path / "offload")))
    return model


def test_blocks_on_disk_give_bit_equal_sweep_perplexities(offloaded, model_dir, tokenizer, text):
    assert is_dispatched(offloaded) and "disk" in offloaded.hf_device_map.values()
    assert offloaded.transformer.h[1].attn.c_attn.weight.device.type == "meta"
    in_memory, _ = load_model(str(model_dir), torch.device("cpu"), "float32")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][:500]
    removals = [(), (0,), (1,), (2,), (3,), (0, 3), ("attn1",), (0, "mlp2")]
    expected, _ = sweep_perplexities(in_memory, ids, removals, 64, 32, progress=False)
    got, _ = sweep_perplexities(offloaded, ids, removals, 64, 32, progress=False)
    assert [r.nll_sum for r in got] == [r.nll_sum for r in expected]
    assert [r.tokens for r in got] == [r.tokens for r in expected]


def test_removal_and_generation_on_an_offloaded_model(offloaded, model_dir):
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.arange(1, 30).view(1, -1)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad(), removed_blocks(offloaded, [2]) as a, removed_blocks(plain, [2]) as b:
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
        assert torch.equal(a.generate(ids, **gen), b.generate(ids, **gen))


def rows(folder) -> list[dict]:
    (path,) = glob.glob(str(folder / "*.csv"))
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_main_with_device_map_matches_and_exports(model_dir, text_file, tmp_path):
    common = ["--model", str(model_dir), "--dataset", str(text_file), "--max-tokens", "200", "--max-length", "64",
              "--no-cache", "--quiet", "--save_results", "--no-speed"]
    offload = ["--device-map", "auto", "--max-memory", MAX_MEMORY, "--offload-dir", str(tmp_path / "off")]
    assert main.main(["--mode", "sequential", *common, "--output-dir", str(tmp_path / "a")]) == 0
    assert main.main(["--mode", "sequential", *common, *offload, "--output-dir", str(tmp_path / "b")]) == 0
    ppl = lambda folder: [(r["removed_layers"], r["perplexity"]) for r in rows(folder)]
    assert ppl(tmp_path / "b") == ppl(tmp_path / "a")
    saved = tmp_path / "saved"
    assert main.main(["--mode", "custom", "--remove", "1", *common, *offload, "--output-dir", str(tmp_path / "c"),
                      "--save-model", str(saved)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32).eval()
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad(), removed_blocks(plain, [1]) as pruned:
        assert torch.equal(reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits)


def test_max_memory_parsing():
    assert parse_max_memory("0=20GiB, cpu=60GiB,disk=1TB") == {0: "20GiB", "cpu": "60GiB", "disk": "1TB"}
    for bad in ("20GiB", "gpu=1GiB", "0=lots"):
        with pytest.raises(KitError):
            parse_max_memory(bad)


def test_offload_options_need_device_map(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--mode", "baseline", "--max-memory", "cpu=1GiB"])
    assert exit_info.value.code == 2 and "needs --device-map" in capsys.readouterr().err
