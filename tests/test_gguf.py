"""GGUF sources and --save-gguf, on tiny Llama GGUF files the tests write with gguf's own writer.

The file holds float (F32, F16) and quantized (Q8_0) tensors and a byte-level
BPE tokenizer. Every check compares against an independent reading: the
file's bytes through GGUFReader, gguf's own dequantize, or a second model
loaded by plain transformers.
"""

from __future__ import annotations

import csv
import glob
import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM

import main
from export.gguf import write_pruned_gguf
from models.gguf_source import source_of
from models.loading import gguf_kwargs, load_model
from models.removal import removed_blocks
from utils.errors import KitError

N_BLOCKS, WIDTH, FFN, HEADS, KV_HEADS = 4, 32, 64, 2, 1
PER_LAYER = [11, 12, 13, 14]  # a per-block metadata array, as some architectures have
# tensor name suffix -> (shape in numpy order, storage type)
BLOCK_TENSORS = {"attn_norm.weight": ((WIDTH,), T.F32), "attn_q.weight": ((WIDTH, WIDTH), T.Q8_0),
                 "attn_k.weight": ((WIDTH // HEADS * KV_HEADS, WIDTH), T.Q8_0),
                 "attn_v.weight": ((WIDTH // HEADS * KV_HEADS, WIDTH), T.F16),
                 "attn_output.weight": ((WIDTH, WIDTH), T.Q8_0), "ffn_norm.weight": ((WIDTH,), T.F32),
                 "ffn_gate.weight": ((FFN, WIDTH), T.Q8_0), "ffn_up.weight": ((FFN, WIDTH), T.F16),
                 "ffn_down.weight": ((WIDTH, FFN), T.Q8_0)}


def stored(values: np.ndarray, kind: T) -> np.ndarray:
    return quantize(values, kind) if kind == T.Q8_0 else values.astype(np.float16 if kind == T.F16 else np.float32)


def write_tiny_gguf(path, tokenizer) -> None:
    """A 4-block Llama with grouped-query attention, in GGUF, with ``tokenizer``'s vocabulary and merges."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_uint32("llama.context_length", 128)
    w.add_uint32("llama.embedding_length", WIDTH)
    w.add_uint32("llama.block_count", N_BLOCKS)
    w.add_uint32("llama.feed_forward_length", FFN)
    w.add_uint32("llama.rope.dimension_count", WIDTH // HEADS)
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_array("llama.test_per_layer", PER_LAYER)
    w.add_uint32("general.file_type", LlamaFileType.MOSTLY_Q8_0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_array("tokenizer.ggml.merges", [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 0)
    w.add_tensor("token_embd.weight", stored(rng.normal(0, 0.5, (len(tokens), WIDTH)), T.F32))
    for i in range(N_BLOCKS):
        for name, (shape, kind) in BLOCK_TENSORS.items():
            values = 1 + rng.normal(0, 0.1, shape) if "norm" in name else rng.normal(0, 0.3, shape)
            w.add_tensor(f"blk.{i}.{name}", stored(values, kind), raw_dtype=kind)
    w.add_tensor("output_norm.weight", np.ones(WIDTH, np.float32))
    w.add_tensor("output.weight", stored(rng.normal(0, 0.5, (len(tokens), WIDTH)), T.Q8_0), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    write_tiny_gguf(path, tokenizer)
    return path


@pytest.fixture(scope="module")
def loaded(gguf_file):
    return load_model(str(gguf_file), torch.device("cpu"), "float32")


def reload(path) -> torch.nn.Module:
    """The GGUF at ``path`` through transformers' own loader, as a user would load it."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32,
                                                **gguf_kwargs(path.name)).eval()


def fields(path) -> dict:
    reader = GGUFReader(str(path))
    return {name: (f.types, f.contents()) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def test_load_dequantizes_and_records_the_source(loaded, gguf_file, tokenizer, text):
    model, from_gguf = loaded
    source = source_of(model)
    assert (source.tensor_types, source.quantized_types, source.file_type) == (("F16", "F32", "Q8_0"), ("Q8_0",),
                                                                              "MOSTLY_Q8_0")
    assert source.describe("float32") == "the source was quantized (Q8_0), dequantized to float32"
    assert model.config.num_hidden_layers == N_BLOCKS and model.dtype == torch.float32
    reader = GGUFReader(str(gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    for name, module in (("blk.2.ffn_gate.weight", model.model.layers[2].mlp.gate_proj),
                         ("blk.1.ffn_down.weight", model.model.layers[1].mlp.down_proj),
                         ("blk.3.ffn_up.weight", model.model.layers[3].mlp.up_proj)):
        t = tensors[name]
        expected = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(module.weight.shape).copy())
        assert torch.equal(module.weight, expected)
    assert from_gguf(text[:2000])["input_ids"] == tokenizer(text[:2000])["input_ids"]  # the vocabulary it was built from


def test_folder_and_gguf_file_name_the_same_source(gguf_file, tmp_path, loaded):
    ids = torch.arange(1, 20).view(1, -1)
    expected = loaded[0](input_ids=ids).logits
    for name, gguf in ((str(gguf_file.parent), None), (str(gguf_file.parent), gguf_file.name)):
        model, _ = load_model(name, torch.device("cpu"), "float32", gguf_file=gguf)
        assert torch.equal(model(input_ids=ids).logits, expected)
    shutil.copy(gguf_file, tmp_path / "a.gguf")
    shutil.copy(gguf_file, tmp_path / "b.gguf")
    with pytest.raises(KitError, match="holds 2 GGUF files"):
        load_model(str(tmp_path), torch.device("cpu"), "float32")
    with pytest.raises(KitError, match="is not a file"):
        load_model(str(tmp_path), torch.device("cpu"), "float32", gguf_file="c.gguf")


def test_pruned_gguf_copies_kept_tensors_byte_for_byte(gguf_file, loaded, tmp_path):
    out = tmp_path / "pruned.gguf"
    write_pruned_gguf(str(gguf_file), [1], str(out))
    before, after = GGUFReader(str(gguf_file)), GGUFReader(str(out))
    old = {t.name: t for t in before.tensors}
    new = {t.name: t for t in after.tensors}
    renamed = {f"blk.{new_i}.{s}": f"blk.{old_i}.{s}" for new_i, old_i in enumerate((0, 2, 3)) for s in BLOCK_TENSORS}
    renamed.update({n: n for n in ("token_embd.weight", "output_norm.weight", "output.weight")})
    assert set(new) == set(renamed)
    for name, source in renamed.items():
        assert new[name].tensor_type == old[source].tensor_type
        assert np.array_equal(np.asarray(new[name].shape), np.asarray(old[source].shape))
        assert new[name].data.tobytes() == old[source].data.tobytes()
    a, b = fields(gguf_file), fields(out)
    assert b.pop("llama.block_count")[1] == N_BLOCKS - 1 and a.pop("llama.block_count")[1] == N_BLOCKS
    assert b.pop("llama.test_per_layer")[1] == [PER_LAYER[i] for i in (0, 2, 3)]
    a.pop("llama.test_per_layer")
    assert a == b  # tokenizer and every other field copied, types included
    assert after.fields["tokenizer.ggml.tokens"].types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    model, _ = loaded
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad(), removed_blocks(model, [1]) as pruned:
        expected = pruned(input_ids=ids).logits
    assert torch.equal(reload(out)(input_ids=ids).logits, expected)


def rows(folder) -> list[dict]:
    (path,) = glob.glob(str(folder / "*.csv"))
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_main_saves_gguf_and_safetensors_from_a_gguf_source(gguf_file, text_file, tmp_path):
    common = ["--dataset", str(text_file), "--max-tokens", "300", "--max-length", "64", "--no-speed", "--no-cache",
              "--device", "cpu", "--quiet", "--save_results"]
    out, folder = tmp_path / "out.gguf", tmp_path / "checkpoint"
    assert main.main(["--mode", "custom", "--remove", "1", "--model", str(gguf_file), *common,
                      "--output-dir", str(tmp_path / "r1"), "--save-gguf", str(out), "--save-model", str(folder)]) == 0
    pruned_ppl = float(rows(tmp_path / "r1")[-1]["perplexity"])
    assert GGUFReader(str(out)).fields["llama.block_count"].contents() == N_BLOCKS - 1
    ids = torch.arange(2, 50).view(1, -1)
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == N_BLOCKS - 1
    assert torch.equal(plain(input_ids=ids).logits, reload(out)(input_ids=ids).logits)
    report = json.loads((folder / "pruning_report.json").read_text())
    assert report["source_gguf"]["quantized_types"] == ["Q8_0"]
    assert "stores quantized weights (Q8_0, file type MOSTLY_Q8_0)" in (folder / "README.md").read_text()
    for model in (str(out), str(folder)):  # both written models measure what the run measured
        name = f"r-{len(list(tmp_path.iterdir()))}"
        assert main.main(["--mode", "baseline", "--model", model, *common, "--output-dir", str(tmp_path / name)]) == 0
        assert float(rows(tmp_path / name)[0]["perplexity"]) == pruned_ppl


@pytest.mark.parametrize("method", ["lstsq", "magnitude"])
def test_a_patched_gguf_holds_the_changed_tensors_as_f32_and_reloads_to_the_kits_model(method, gguf_file, text_file,
                                                                                        tmp_path):
    common = ["--dataset", str(text_file), "--max-tokens", "300", "--calib-tokens", "256", "--max-length", "64",
              "--no-speed", "--no-cache", "--device", "cpu", "--quiet", "--save_results"]
    out, folder = tmp_path / "patched.gguf", tmp_path / "checkpoint"
    assert main.main(["--mode", "custom", "--remove", "1", "--patch", method, "--model", str(gguf_file), *common,
                      "--output-dir", str(tmp_path / "r"), "--save-gguf", str(out), "--save-model", str(folder)]) == 0
    patched_ppl = float(rows(tmp_path / "r")[-1]["perplexity"])
    source = {t.name: t for t in GGUFReader(str(gguf_file)).tensors}
    written = {t.name: t for t in GGUFReader(str(out)).tensors}
    changed = {"lstsq": {"blk.0.ffn_down.weight"},
               "magnitude": {f"blk.{i}.{s}" for i in (1, 2) for s in ("attn_output.weight", "ffn_down.weight")}}
    for name, tensor in written.items():
        old = source[name if not name.startswith("blk.") or name.startswith("blk.0.")
                     else f"blk.{int(name.split('.')[1]) + 1}.{name.split('.', 2)[2]}"]
        if name in changed[method]:
            assert tensor.tensor_type == T.F32 and tensor.data.tobytes() != old.data.tobytes()
        else:
            assert tensor.tensor_type == old.tensor_type and tensor.data.tobytes() == old.data.tobytes()
    ids = torch.arange(2, 50).view(1, -1)
    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert torch.equal(plain(input_ids=ids).logits, reload(out)(input_ids=ids).logits)
    assert main.main(["--mode", "baseline", "--model", str(out), *common, "--output-dir", str(tmp_path / "b")]) == 0
    assert float(rows(tmp_path / "b")[0]["perplexity"]) == patched_ppl


@pytest.mark.parametrize("argv, message", [
    (["--mode", "custom", "--remove", "1,attn2"], "whole blocks only"),
    (["--mode", "importance", "--unit", "mlp", "--num-remove", "1"], "whole blocks only"),
    (["--mode", "sequential"], "--save-gguf works with --mode"),
    (["--mode", "custom", "--remove", "1", "--heal-steps", "2"], "healing changes them"),
])
def test_save_gguf_refusals(argv, message, gguf_file, text_file, tmp_path, capsys):
    status = main.main([*argv, "--model", str(gguf_file), "--dataset", str(text_file), "--no-speed",
                        "--save-gguf", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_save_gguf_refuses_a_non_gguf_source_before_loading(model_dir, text_file, tmp_path, capsys):
    status = main.main(["--mode", "custom", "--remove", "1", "--model", str(model_dir), "--dataset", str(text_file),
                        "--no-speed", "--save-gguf", str(tmp_path / "x.gguf")])
    assert status == 2 and "is not a GGUF file" in capsys.readouterr().err
