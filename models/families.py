"""What the kit knows about each decoder family, one registry entry each.

Block removal (models.removal), the shared-prefix engine (evaluation.engine),
healing and export ask the entry of a model's ``model_type``; no other module
names a family. Add a family with one FAMILIES entry and a tiny model of it in
tests/test_families.py.

An entry says where the block list lives, which config fields state the
depth and describe each layer, which attribute holds a block's own index (the
KV cache is indexed by it), the modules between the last block and the LM
head, whether a block returns a tuple, and any config fields that are repaired
by hand when blocks go or that make removal impossible.

A block's own attention kind (full or sliding window) is fixed in its
attention module when the model is built, so it moves with the block; the
model's forward picks each block's mask (and Gemma 3 its local or global
rotary embedding) from config.layer_types by position, which removal slices
to the kept blocks. Gemma normalizes each sublayer's output before adding it
to the residual stream (post_attention_layernorm, post_feedforward_layernorm):
a stub's zeros stay zeros through those RMS norms, so a skipped sublayer still
adds exactly nothing, and the stream after the attention is the output of that
norm (``Family.attention_added``). Gemma 2 soft-caps its logits after the LM
head (``lm_head``).

How a block is called is not written here by hand: the engine runs the
model's own forward once per window batch with recorders in place of the
blocks (models.families.record_block_calls), so each block is later called
with exactly the keyword arguments (mask of its own attention kind, rotary
embeddings, position ids) that the model itself gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from utils.errors import KitError

# Config fields that state the depth; those a config has are kept in step.
DEPTH_FIELDS = ("n_layer", "num_hidden_layers", "num_layers")


@dataclass(frozen=True)
class Family:
    model_type: str
    blocks: str  # dotted path of the block list from the *ForCausalLM model
    final: tuple[str, ...]  # modules applied between the last block and the LM head, in order (absent ones skipped)
    per_layer_fields: tuple[str, ...] = ()  # config lists with one entry per block
    index_attrs: tuple[str, ...] = ("layer_idx",)  # attributes through which modules know their position
    returns_tuple: bool = False  # the block returns (hidden_states, ...) instead of a tensor
    transposed_linears: bool = False  # linear weights stored (in, out), as transformers' Conv1D (LoRA must know)
    # family-specific config fields rewritten for the kept blocks: (config, keep, state before removal)
    rewrite: Callable[[Any, Sequence[int], dict], None] | None = None
    saved: tuple[str, ...] = ()  # config fields ``rewrite`` changes, saved and restored with the depth
    # a reason why blocks of this model cannot be removed, or None
    refuse: Callable[[Any], str | None] | None = None
    # A block's sublayers, as attribute paths from the block: its attention module, the modules of its MLP
    # (OPT's MLP is inline: fc1, then fc2), and the output projection of each (zeroed by export).
    attention: str = "self_attn"
    mlp: tuple[str, ...] = ("mlp",)
    attention_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"
    # the modules whose outputs are summed into the stream entering block 0, each a tuple of alternatives,
    # the first the model has being the one used (OPT projects its token embeddings with project_in when
    # their width differs from the blocks'); --patch merges a map for a run from block 0 into them
    embeddings: tuple[tuple[str, ...], ...] = (("model.embed_tokens",),)
    attention_norm: str | None = None  # a norm of the attention's output before the residual add (Gemma)
    mlp_norm: str | None = None  # a norm of the MLP's output before the residual add (Gemma)
    norm_offset: float = 0.0  # these norms scale by (offset + weight): Gemma's RMSNorm multiplies by 1 + weight
    logit_cap: str | None = None  # config field of a soft cap on the logits, cap * tanh(logits / cap) (Gemma 2)

    @property
    def attention_added(self) -> str:
        """The module whose output the block adds to the residual stream for its attention."""
        return self.attention_norm or self.attention


def _gpt2_refuse(config) -> str | None:
    # GPT-2 can scale attention by 1/(layer index + 1), fixed when the block is
    # built: a renumbered block would compute something else after a reload.
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return ("this model scales attention by its layer index (scale_attn_by_inverse_layer_idx), so removing "
                "blocks would change the kept blocks; it is not supported")
    return None


def run_lengths(kinds: Sequence[str]) -> list[list]:
    """GPT-Neo's attention_types for a list of per-block kinds: [[[kind], repeats], ...]."""
    runs: list[list] = []
    for kind in kinds:
        if runs and runs[-1][0] == [kind]:
            runs[-1][1] += 1
        else:
            runs.append([[kind], 1])
    return runs


def _gpt_neo_rewrite(config, keep: Sequence[int], state: dict) -> None:
    # GPT-Neo rebuilds attention_layers from attention_types when it loads.
    config.attention_types = run_lengths(config.attention_layers)


def _qwen2_rewrite(config, keep: Sequence[int], state: dict) -> None:
    # Blocks below max_window_layers use full attention, the rest a sliding window.
    if isinstance(state.get("max_window_layers"), int):
        config.max_window_layers = sum(1 for i in keep if i < state["max_window_layers"])


def _gemma3_rewrite(config, keep: Sequence[int], state: dict) -> None:
    # Gemma 3 configs may still carry the old period of full-attention blocks; the sliced layer_types
    # are what the model reads, and a period that no longer gives them is cleared so no tool derives
    # the kinds from it.
    for name in ("sliding_window_pattern", "_sliding_window_pattern"):
        period = state.get(name)
        if isinstance(period, int) and config.layer_types != [
                "sliding_attention" if (i + 1) % period else "full_attention" for i in range(len(keep))]:
            setattr(config, name, None)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt2", "transformer.h", ("transformer.ln_f",), transposed_linears=True, refuse=_gpt2_refuse,
           attention="attn", attention_out="attn.c_proj", mlp_out="mlp.c_proj",
           embeddings=(("transformer.wte",), ("transformer.wpe",))),
    Family("gpt_neo", "transformer.h", ("transformer.ln_f",), per_layer_fields=("attention_layers",),
           index_attrs=("layer_id",), returns_tuple=True, rewrite=_gpt_neo_rewrite, saved=("attention_types",),
           attention="attn", attention_out="attn.attention.out_proj", mlp_out="mlp.c_proj",
           embeddings=(("transformer.wte",), ("transformer.wpe",))),
    Family("gpt_neox", "gpt_neox.layers", ("gpt_neox.final_layer_norm",), per_layer_fields=("layer_types",),
           attention="attention", attention_out="attention.dense", mlp_out="mlp.dense_4h_to_h",
           embeddings=(("gpt_neox.embed_in",),)),
    Family("opt", "model.decoder.layers", ("model.decoder.final_layer_norm", "model.decoder.project_out"),
           per_layer_fields=("layer_types",), attention_out="self_attn.out_proj", mlp=("fc1", "fc2"),
           mlp_out="fc2", embeddings=(("model.decoder.project_in", "model.decoder.embed_tokens"),
                                      ("model.decoder.embed_positions",))),
    Family("llama", "model.layers", ("model.norm",), per_layer_fields=("layer_types",)),
    Family("mistral", "model.layers", ("model.norm",), per_layer_fields=("layer_types",)),
    Family("qwen2", "model.layers", ("model.norm",), per_layer_fields=("layer_types",), rewrite=_qwen2_rewrite,
           saved=("max_window_layers",)),
    Family("qwen3", "model.layers", ("model.norm",), per_layer_fields=("layer_types",), rewrite=_qwen2_rewrite,
           saved=("max_window_layers",)),
    Family("phi3", "model.layers", ("model.norm",)),
    Family("gemma2", "model.layers", ("model.norm",), per_layer_fields=("layer_types",),
           attention_norm="post_attention_layernorm", mlp_norm="post_feedforward_layernorm", norm_offset=1.0,
           logit_cap="final_logit_softcapping"),
    Family("gemma3_text", "model.layers", ("model.norm",), per_layer_fields=("layer_types",),
           rewrite=_gemma3_rewrite, saved=("sliding_window_pattern", "_sliding_window_pattern"),
           attention_norm="post_attention_layernorm", mlp_norm="post_feedforward_layernorm", norm_offset=1.0,
           logit_cap="final_logit_softcapping"),
)}


def family_of(model: nn.Module) -> Family:
    """The registry entry of ``model``, or a KitError naming the supported families."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise KitError(f"model type '{model_type}' is not supported (supported: {', '.join(sorted(FAMILIES))})")
    if getattr(config, "is_heterogeneous", False):
        raise KitError(f"this {model_type} model has a per-layer config (per_layer_config), which block removal "
                       "does not renumber; it is not supported")
    return FAMILIES[model_type]


def check_prunable(model: nn.Module) -> None:
    """Refuse, before any work, a model whose blocks cannot be removed."""
    family = family_of(model)
    reason = family.refuse(model.config) if family.refuse else None
    if reason:
        raise KitError(reason)


def module_at(model: nn.Module, path: str) -> Any:
    target: Any = model
    for attr in path.split("."):
        target = getattr(target, attr, None)
    return target


def block_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the block list and the list's attribute name."""
    *parents, name = family_of(model).blocks.split(".")
    return module_at(model, ".".join(parents)) if parents else model, name


def get_blocks(model: nn.Module) -> nn.ModuleList:
    parent, name = block_owner(model)
    return getattr(parent, name)


def num_blocks(model: nn.Module) -> int:
    return len(get_blocks(model))


def final_modules(model: nn.Module) -> list[nn.Module]:
    """What turns the last block's output into the LM head's input (final norm, OPT's project_out)."""
    return [m for m in (module_at(model, p) for p in family_of(model).final) if m is not None]


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap), in the order Gemma's forward computes it."""
    return torch.tanh(logits / cap) * cap


class SoftCappedHead(nn.Module):
    """The LM head followed by the family's logit soft cap, for code that applies the head itself."""

    def __init__(self, linear: nn.Linear, cap: float):
        super().__init__()
        self.linear, self.cap = linear, cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return soft_cap(self.linear(hidden), self.cap)


def lm_head(model: nn.Module) -> nn.Module:
    """What turns final hidden states into the model's logits: its output embeddings, soft-capped where
    the family caps them (Gemma 2), so a perplexity computed from hidden states is the model's own."""
    head, field = model.get_output_embeddings(), family_of(model).logit_cap
    cap = getattr(model.config, field, None) if field else None
    return SoftCappedHead(head, cap) if cap else head


def block_output(model: nn.Module, output: Any) -> torch.Tensor:
    """The hidden state a block returns: GPT-Neo's blocks return a tuple, the others a tensor.

    Called once per block evaluation in the engine, so it looks at the output, not the registry."""
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class BlockCall:
    """The arguments one block received in the model's own forward pass, its hidden state left out."""

    args: tuple
    kwargs: dict

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        if self.args:
            return block(hidden, *self.args, **self.kwargs)
        return block(hidden_states=hidden, **self.kwargs)


class _Recorder(nn.Module):
    """Stands in for a block: records how it is called and passes the hidden state through."""

    def __init__(self, block: nn.Module, calls: list, returns_tuple: bool):
        super().__init__()
        self.__dict__["wrapped"] = block  # not a submodule: parameters stay the block's own
        self.calls, self.returns_tuple = calls, returns_tuple

    def __getattr__(self, name: str):  # e.g. Qwen2 reads decoder_layer.attention_type in its loop
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["wrapped"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((hidden, BlockCall(tuple(args[1:]), kwargs)))
        return (hidden,) if self.returns_tuple else hidden


@torch.no_grad()
def record_block_calls(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[BlockCall]]:
    """The hidden state entering block 0, and how the model calls each block, for one batch.

    The model's own forward runs with every block replaced by a recorder that
    returns its input, so this costs the embeddings and the final norm only.
    """
    family = family_of(model)
    parent, name = block_owner(model)
    blocks = getattr(parent, name)
    calls: list = []
    try:
        setattr(parent, name, nn.ModuleList([_Recorder(b, calls, family.returns_tuple) for b in blocks]))
        model.base_model(input_ids=input_ids, use_cache=False)
    finally:
        setattr(parent, name, blocks)
    if len(calls) != len(blocks):
        raise RuntimeError(f"the {family.model_type} forward called {len(calls)} of {len(blocks)} blocks")
    return calls[0][0], [call for _, call in calls]
