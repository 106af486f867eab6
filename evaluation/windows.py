"""Evaluation windows: the perplexity protocols of the field, one function each.

Papers report perplexity under different protocols, and the same model's
number moves with them (more context per scored token lowers it). A
protocol is a rule that cuts a token stream into windows; every window says
which stream tokens the model is fed, which token (if any) is fed before them,
and which stream tokens it scores. The LM head and loss are the same for all
of them (evaluation.perplexity), so the one-model-at-a-time path, the
shared-prefix engine and calibration all take their windows from
``make_windows``.

- ``sliding``: the transformers perplexity guide. Windows of ``max_length``
  start every ``stride`` tokens; each scores only the tokens no earlier window
  scored, with the window's earlier tokens as context.
- ``disjoint``: consecutive non-overlapping windows of ``max_length``, each
  scoring every token but its first, and a trailing partial window dropped: the
  evaluation loop of GPTQ (Frantar et al., 2023) that SLEB (Song et al., 2024),
  ShortGPT (Men et al., 2024) and most depth-pruning papers reuse.
- ``lm-eval``: lm-evaluation-harness's ``loglikelihood_rolling`` (Gao et al.,
  "A framework for few-shot language model evaluation"): the first window is
  the prefix token (BOS, or end-of-text where the tokenizer has no BOS) and the
  first ``max_length - 1`` tokens, and it scores every token it holds, the
  stream's first included; each later window scores the next ``max_length``
  tokens given the one token before them; the last one is filled to full
  length with earlier tokens as context.

With ``bos`` (sliding and disjoint), every window is fed BOS before its text
and holds one text token less; BOS is context, never a target, and the scored
tokens follow the same rule as without it. Llama, Mistral and Qwen2
checkpoints were trained with BOS at the start of every sequence.

This module needs no torch: main.py reads the registry for --protocol's
choices and checks while answering --help at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

from config import WindowSpec
from utils.errors import KitError


@dataclass(frozen=True)
class Window:
    begin: int  # first stream token fed to the model
    end: int  # one past the last stream token fed
    first_target: int  # stream tokens [first_target, stop) are scored
    last_target: int | None = None  # one past the last scored token; None: ``end``
    prefix: int | None = None  # a token id fed before ids[begin] (BOS, lm-eval's prefix token)

    @property
    def stop(self) -> int:
        return self.end if self.last_target is None else self.last_target

    @property
    def length(self) -> int:
        """Tokens fed to the model, the prefix included."""
        return self.end - self.begin + (self.prefix is not None)

    @property
    def scored(self) -> int:
        return self.stop - self.first_target

    def position(self, token: int) -> int:
        """Position in the model's input whose hidden state predicts stream token ``token``."""
        return token - 1 - self.begin + (self.prefix is not None)


def sliding_windows(n_tokens: int, max_length: int, stride: int, prefix: int | None = None) -> list[Window]:
    capacity = max_length - (prefix is not None)
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + capacity, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first, prefix=prefix))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def disjoint_windows(n_tokens: int, max_length: int, stride: int | None, prefix: int | None = None) -> list[Window]:
    capacity = max_length - (prefix is not None)
    if n_tokens <= capacity:  # too short for one full window: the whole stream is the window
        return [Window(0, n_tokens, 1, prefix=prefix)]
    return [Window(begin, begin + capacity, begin + 1, prefix=prefix)
            for begin in range(0, n_tokens - capacity + 1, capacity)]


def lm_eval_windows(n_tokens: int, max_length: int, stride: int | None, prefix: int | None) -> list[Window]:
    first = min(max_length, n_tokens)
    windows = [Window(0, first - 1, 0, first, prefix)]
    predicted = first
    while predicted < n_tokens:
        stop = min(n_tokens, predicted + max_length)
        # fed: the max_length tokens before the last target; scored: tokens not yet predicted
        windows.append(Window(stop - max_length - 1, stop - 1, predicted, stop))
        predicted = stop
    return windows


@dataclass(frozen=True)
class Protocol:
    build: Callable[[int, int, int | None, int | None], list[Window]]
    strided: bool  # reads --stride
    takes_bos: bool  # --bos may prefix its windows
    prefixed: bool  # always feeds a prefix token (lm-eval's BOS or end-of-text)
    help: str
    # the windows in a sentence for the model card, formatted with the evaluation's max_length, stride and
    # prefix_token
    sentence: str


PROTOCOLS: dict[str, Protocol] = {
    "sliding": Protocol(sliding_windows, strided=True, takes_bos=True, prefixed=False,
                          help="windows every --stride tokens, each scoring what no earlier one scored "
                               "(the transformers guide)",
                          sentence="sliding windows of {max_length} tokens every {stride} tokens (each scoring what "
                                   "no earlier window scored; the transformers guide's procedure)"),
    "disjoint": Protocol(disjoint_windows, strided=False, takes_bos=True, prefixed=False,
                           help="non-overlapping windows of --max-length, each scoring all but its first token, "
                                "partial last window dropped (GPTQ's loop, as SLEB and ShortGPT report)",
                           sentence="non-overlapping windows of {max_length} tokens, each scoring all but its first "
                                    "token, a partial last window dropped (GPTQ's loop, as SLEB and ShortGPT report)"),
    "lm-eval": Protocol(lm_eval_windows, strided=False, takes_bos=False, prefixed=True,
                          help="lm-evaluation-harness loglikelihood_rolling: first window after the BOS (or "
                               "end-of-text) token scoring every token, then disjoint windows with one token of "
                               "context",
                          sentence="lm-evaluation-harness's rolling windows of {max_length} tokens (the first after "
                                   "token id {prefix_token}, scoring every token; then disjoint windows with one "
                                   "token of context)"),
}
DEFAULT_PROTOCOL = "sliding"


def make_windows(n_tokens: int, max_length: int, stride: int | None, protocol: str = DEFAULT_PROTOCOL,
                 prefix_token: int | None = None) -> list[Window]:
    """The windows of ``protocol`` over a stream of ``n_tokens``.

    ``prefix_token`` is fed before every window's text for sliding and
    disjoint (BOS; None: nothing), before the first window's for lm-eval.
    """
    if n_tokens < 2:
        raise ValueError("need at least two tokens to score one")
    return PROTOCOLS[protocol].build(n_tokens, max_length, stride, prefix_token)


def prefix_token(protocol: str, bos: bool, bos_token_id: int | None, eos_token_id: int | None) -> int | None:
    """The token a run feeds before windows: BOS with ``bos``; lm-eval's own choice (its
    ``prefix_token_id``: BOS, else end-of-text) for lm-eval; otherwise none."""
    if bos:
        if bos_token_id is None:
            raise KitError("--bos: this tokenizer defines no BOS token")
        return bos_token_id
    if not PROTOCOLS[protocol].prefixed:
        return None
    token = bos_token_id if bos_token_id is not None else eos_token_id
    if token is None:
        raise KitError(f"--protocol {protocol} needs a BOS or end-of-text token, and this tokenizer defines neither")
    return token


def resolve_windows(spec: WindowSpec, context: int, tokenizer) -> WindowSpec:
    """``spec`` resolved against the model's context and the tokenizer's BOS and end-of-text tokens."""
    spec = spec.resolved(context, PROTOCOLS[spec.protocol].strided)
    token = prefix_token(spec.protocol, spec.bos, getattr(tokenizer, "bos_token_id", None),
                         getattr(tokenizer, "eos_token_id", None))
    return replace(spec, prefix_token=token)


def spec_windows(spec: WindowSpec, n_tokens: int) -> list[Window]:
    """The windows of a resolved WindowSpec over a stream of ``n_tokens``."""
    return make_windows(n_tokens, spec.max_length, spec.stride, spec.protocol, spec.prefix_token)


def window_batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, at most batch_size at a time."""
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w.length != batch[0].length):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch
