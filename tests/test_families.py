"""Block removal on every supported decoder family, with tiny random models
built from each family's config class (no download).

Each model mixes attention kinds where its family has them (GPT-Neo local and
global blocks, Qwen2 and Qwen3 full then sliding-window blocks, Gemma 2
alternating sliding and full, Gemma 3 two sliding then one full) and uses a
window shorter than the test sequence, so a config that described the wrong
kind for a kept block would change the reloaded model's logits. The tiny
Gemma 2 caps its logits low enough (0.3) that a perplexity without the cap
would differ.
"""

import json

import pandas as pd
import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          GPTJConfig, GPTJForCausalLM, GPTNeoConfig, GPTNeoForCausalLM, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          OPTConfig, OPTForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

import main
from evaluation.engine import sweep_perplexities
from evaluation.perplexity import perplexity
from models.families import FAMILIES as REGISTRY
from models.families import get_blocks, num_blocks
from models.removal import removed_blocks
from config import RunConfig, SelectSpec
from pruning.calibration import Calibration
from pruning.compare import compare_sets
from pruning.search import beam, greedy
from tiny import make_model, make_text, make_tokenizer

N_LAYER = 4
WINDOW = 6  # sliding/local attention window, shorter than SEQ
SEQ = 24
SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
             bos_token_id=0, eos_token_id=0)
GEMMA = dict(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, pad_token_id=0,
             **SMALL)


def gemma(family: str, vocab: int, n_layer: int = N_LAYER) -> torch.nn.Module:
    """Gemma 2 (sliding, full, sliding, ...: its default kinds) or Gemma 3 text (the kinds its
    sliding_window_pattern of 3 derives: two sliding blocks, then one full)."""
    torch.manual_seed(0)
    if family == "gemma2":
        config = Gemma2Config(num_hidden_layers=n_layer, vocab_size=vocab, final_logit_softcapping=0.3, **GEMMA)
        return Gemma2ForCausalLM(config).eval()
    config = Gemma3TextConfig(num_hidden_layers=n_layer, vocab_size=vocab, sliding_window_pattern=3, **GEMMA)
    return Gemma3ForCausalLM(config).eval()


def build(family: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        return make_model(n_layer=N_LAYER, vocab_size=vocab)
    if family == "gpt_neo":
        config = GPTNeoConfig(num_layers=N_LAYER, attention_types=[[["global", "local"], N_LAYER // 2]],
                              window_size=WINDOW, hidden_size=32, num_heads=2, max_position_embeddings=64,
                              vocab_size=vocab, bos_token_id=0, eos_token_id=0)
        return GPTNeoForCausalLM(config).eval()
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=N_LAYER, vocab_size=vocab, **SMALL)).eval()
    if family == "opt":
        config = OPTConfig(num_hidden_layers=N_LAYER, vocab_size=vocab, hidden_size=32, num_attention_heads=2,
                           ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1,
                           bos_token_id=0, eos_token_id=0)
        return OPTForCausalLM(config).eval()
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=N_LAYER, num_key_value_heads=1, vocab_size=vocab,
                                            **SMALL)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(num_hidden_layers=N_LAYER, num_key_value_heads=1,
                                                sliding_window=WINDOW, vocab_size=vocab, **SMALL)).eval()
    if family == "qwen2":
        config = Qwen2Config(num_hidden_layers=N_LAYER, num_key_value_heads=1, use_sliding_window=True,
                             sliding_window=WINDOW, max_window_layers=2, vocab_size=vocab, **SMALL)
        return Qwen2ForCausalLM(config).eval()
    if family == "qwen3":
        config = Qwen3Config(num_hidden_layers=N_LAYER, num_key_value_heads=1, head_dim=16, use_sliding_window=True,
                             sliding_window=WINDOW, max_window_layers=2, vocab_size=vocab, **SMALL)
        return Qwen3ForCausalLM(config).eval()
    if family == "phi3":
        config = Phi3Config(num_hidden_layers=N_LAYER, num_key_value_heads=1, sliding_window=WINDOW, pad_token_id=0,
                            vocab_size=vocab, **SMALL)
        return Phi3ForCausalLM(config).eval()
    if family in ("gemma2", "gemma3_text"):
        return gemma(family, vocab)
    raise ValueError(family)


FAMILIES = sorted(REGISTRY)



@pytest.fixture(scope="module")
def text() -> str:
    return make_text(120)


@pytest.fixture(scope="module")
def tokenizer(text):
    return make_tokenizer(text)


@pytest.fixture(scope="module")
def ids(tokenizer, text) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"][:SEQ]).view(1, -1)


def test_every_listed_family_is_tested():
    assert FAMILIES == ["gemma2", "gemma3_text", "gpt2", "gpt_neo", "gpt_neox", "llama", "mistral", "opt", "phi3",
                        "qwen2", "qwen3"]


@torch.no_grad()
def cached_logits(model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits of the last positions, fed one token at a time after a cached prefix."""
    out = model(ids[:, :prefix], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def config_fields(model) -> dict:
    """The config as a dict, less what save_pretrained itself records."""
    fields = model.config.to_dict()
    return {k: v for k, v in fields.items() if k not in ("architectures", "dtype")}


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_pruned_model_runs_generates_and_reloads(family, tokenizer, ids, tmp_path):
    model = build(family, len(tokenizer))
    original = model(ids).logits
    original_config = config_fields(model)
    remove = (1,)  # GPT-Neo: a local block; Qwen2: a full-attention block before the sliding ones

    with removed_blocks(model, remove) as pruned:
        assert num_blocks(pruned) == N_LAYER - 1
        assert pruned.config.num_hidden_layers == N_LAYER - 1
        logits = pruned(ids, use_cache=False).logits
        assert not torch.allclose(logits, original)
        # The KV cache is indexed by the renumbered blocks: decoding token by
        # token reproduces the uncached forward pass.
        torch.testing.assert_close(cached_logits(pruned, ids, prefix=SEQ - 8), logits, rtol=1e-4, atol=1e-5)
        greedy = pruned.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=12,
                                 min_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = pruned.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=12,
                                   min_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
        assert greedy.shape == (1, 20) and torch.equal(greedy, uncached)
        pruned.save_pretrained(tmp_path)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert num_blocks(reloaded) == N_LAYER - 1 == reloaded.config.num_hidden_layers
    torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=1e-6)
    # and the in-memory model is whole again
    assert num_blocks(model) == N_LAYER and config_fields(model) == original_config
    assert torch.equal(model(ids).logits, original)


def test_per_layer_config_fields_follow_the_kept_blocks(tokenizer):
    neo = build("gpt_neo", len(tokenizer))
    with removed_blocks(neo, (1, 2)) as pruned:  # kinds were global, local, global, local
        assert pruned.config.attention_layers == ["global", "local"]
        # attention_types, the field a user edits, says the same
        assert GPTNeoConfig.expand_attention_types_params(pruned.config.attention_types) == ["global", "local"]
        assert [b.attn.attention.layer_id for b in get_blocks(pruned)] == [0, 1]
    assert neo.config.attention_layers == ["global", "local"] * 2

    qwen = build("qwen2", len(tokenizer))
    assert qwen.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    with removed_blocks(qwen, (0, 3)) as pruned:
        assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
        assert pruned.config.max_window_layers == 1
    assert qwen.config.max_window_layers == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_matches_the_models_own_loss(family, tokenizer, ids):
    """One window covering the sequence: the kit's PPL is exp of the model's mean loss."""
    model = build(family, len(tokenizer))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.double()
    result = perplexity(model, ids[0], max_length=SEQ, stride=SEQ, progress=False)
    assert result.tokens == SEQ - 1
    assert result.perplexity == pytest.approx(torch.exp(loss).item(), rel=1e-5)


@pytest.mark.parametrize("family", ["qwen2"])
def test_sequential_mode_on_a_saved_model(family, tokenizer, text, tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    build(family, len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    code = main.main(["--mode", "sequential", "--model", str(model_dir), "--dataset", str(tmp_path / "corpus.txt"),
                      "--max-tokens", "300", "--max-length", "32", "--speed-runs", "1", "--speed-warmup", "0",
                      "--gen-tokens", "4", "--quiet", "--save_results", "--output-dir", str(out)])
    assert code == 0
    [csv] = out.glob("*.csv")
    rows = pd.read_csv(csv)
    assert [json.loads(r) for r in rows.removed_layers] == [[]] + [[i] for i in range(N_LAYER)]
    assert rows.num_layers.tolist() == [N_LAYER] + [N_LAYER - 1] * N_LAYER
    assert rows.params.iloc[1:].nunique() == 1 and rows.params.iloc[1] < rows.params.iloc[0]
    assert (rows.latency_ms > 0).all() and rows.perplexity.notna().all()


def test_other_model_types_get_a_clear_error(tokenizer, text, tmp_path, capsys):
    model_dir = tmp_path / "gptj"
    config = GPTJConfig(n_layer=2, n_embd=32, n_head=2, rotary_dim=8, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=0, eos_token_id=0)
    GPTJForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    code = main.main(["--mode", "sequential", "--model", str(model_dir), "--dataset", str(tmp_path / "corpus.txt"),
                      "--no-speed", "--save_results", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: model type 'gptj' is not supported") and err.count("\n") == 1
    assert all(name in err for name in FAMILIES)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def long_ids(tokenizer, text) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"][:200])


# (protocol, stride, prefix token): each convention of evaluation.windows, and sliding after BOS
PROTOCOLS = [("sliding", 16, None), ("sliding", 16, 0), ("disjoint", None, 0), ("lm-eval", None, 0)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("protocol, stride, prefix", PROTOCOLS)
def test_engine_equals_one_model_at_a_time(family, batch_size, protocol, stride, prefix, tokenizer, long_ids):
    """Every family through the shared-prefix engine: each pruned model's perplexity is the one
    it gets evaluated alone, to the last bit, with the first and the last block among those removed,
    under every perplexity convention; windows shorter than the sequence and (GPT-Neo, Mistral,
    Qwen2) than the local attention span."""
    model = build(family, len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    removals = [(), (0,), (N_LAYER - 1,), (1, 2), (0, N_LAYER - 1)]
    windows = dict(progress=False, protocol=protocol, prefix_token=prefix)
    shared, _ = sweep_perplexities(model, long_ids, removals, 32, stride, batch_size, **windows)
    for removed, result in zip(removals, shared):
        with removed_blocks(model, removed) as pruned:
            alone = perplexity(pruned, long_ids, 32, stride, batch_size, **windows)
        assert result == alone, (family, removed)
    assert num_blocks(model) == N_LAYER
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class OneAtATime(Calibration):
    """Calibration whose perplexities come from each pruned model evaluated alone, not from the engine."""

    def perplexities(self, removals):
        out = []
        for removed in removals:
            with removed_blocks(self.model, removed) as pruned:
                out.append(perplexity(pruned, self.ids, self.max_length, self.stride, progress=False).perplexity)
        return out


@pytest.mark.parametrize("family", FAMILIES)
def test_searches_and_compare_choose_the_same_through_the_engine_and_one_model_at_a_time(family, tokenizer,
                                                                                           long_ids):
    model = build(family, len(tokenizer))
    engine = Calibration(model, lambda: long_ids, 32, 16, progress=False)
    alone = OneAtATime(model, lambda: long_ids, 32, 16, progress=False)
    assert greedy(engine.perplexities, N_LAYER, 3, False) == greedy(alone.perplexities, N_LAYER, 3, False)
    assert beam(engine.perplexities, N_LAYER, 2, 2, False) == beam(alone.perplexities, N_LAYER, 2, 2, False)
    # compare: every rule's pick for k = 1..3, greedy, beam and a short evolve included, and the ppl rule's scores
    config = RunConfig(mode="compare", select=SelectSpec(generations=3, offspring=4))
    assert compare_sets(config, engine).chosen == compare_sets(config, alone).chosen
