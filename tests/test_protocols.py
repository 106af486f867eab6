"""The perplexity conventions of the field (--protocol sliding|disjoint|lm-eval, --bos): each one's
windows, checked against an independent computation, and the same windows everywhere (results file,
sidecar, model card)."""

import csv
import json
import math

import pytest
import torch
from torch.nn import functional as F

import main
from evaluation.perplexity import batch_inputs, perplexity
from evaluation.windows import PROTOCOLS, Window, disjoint_windows, make_windows, sliding_windows


@pytest.fixture(scope="module")
def ids(tokenizer, text):
    return torch.tensor(tokenizer(text)["input_ids"][:300])


def lm_eval_pairs(tokens: list[int], prefix: int, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-evaluation-harness's loglikelihood_rolling requests, as its documentation describes them:
    rolling windows with one token of context (the first predicts every token after the prefix
    token), made disjoint. From lm_eval itself when it is installed, else written out here."""
    try:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:
        pairs, done = [], min(max_seq_len, len(tokens))
        pairs.append(([prefix], tokens[:done]))
        while done < len(tokens):
            stop = min(len(tokens), done + max_seq_len)
            pairs.append((tokens[stop - max_seq_len - 1 : done], tokens[done:stop]))
            done = stop
        return pairs
    return [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix, max_seq_len, 1)]


@torch.no_grad()
def log_likelihood(model, context: list[int], continuation: list[int]) -> float:
    """What lm-eval's HF model scores for one request: the model is fed (context + continuation)[:-1]
    and the log-probabilities of the continuation are read off its last positions."""
    fed = torch.tensor([(context + continuation)[:-1]])
    logprobs = F.log_softmax(model(input_ids=fed).logits[0].double(), dim=-1)
    tail = logprobs[-len(continuation):]
    return tail[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item()


@pytest.mark.parametrize("n_tokens, max_length", [(300, 64), (256, 64), (50, 64), (129, 64)])
def test_lm_eval_total_log_likelihood_equals_its_rolling_windows(model, ids, n_tokens, max_length):
    model = model.double()  # rounding of the two computations stays far below the tolerance
    stream, eot = ids[:n_tokens], 0
    pairs = lm_eval_pairs(stream.tolist(), eot, max_length)
    want = sum(log_likelihood(model, c, t) for c, t in pairs)
    got = perplexity(model, stream, max_length, None, progress=False, protocol="lm-eval", prefix_token=eot)
    assert got.tokens == n_tokens  # every token is scored once, the first one included
    assert -got.nll_sum == pytest.approx(want, rel=1e-9, abs=0)


def test_lm_eval_windows_fit_the_context_and_score_every_token_once():
    windows = make_windows(300, 64, None, "lm-eval", prefix_token=7)
    assert [w.length for w in windows] == [64] * len(windows)
    assert windows[0].prefix == 7 and all(w.prefix is None for w in windows[1:])
    scored = [t for w in windows for t in range(w.first_target, w.stop)]
    assert scored == list(range(300))


@pytest.mark.parametrize("n, max_length", [(100, 16), (96, 16), (10, 16), (17, 16)])
def test_disjoint_windows_do_not_overlap_and_score_all_but_their_first_token(n, max_length):
    windows = disjoint_windows(n, max_length, None)
    covered = [t for w in windows for t in range(w.begin, w.end)]
    assert covered == list(range(len(covered)))  # consecutive, no token fed twice
    assert all(w.length == max_length for w in windows) or windows == [Window(0, n, 1)]  # shorter than one window
    scored = [t for w in windows for t in range(w.first_target, w.stop)]
    assert scored == [t for t in covered if t not in {w.begin for w in windows}]
    # a partial last window is dropped, as GPTQ's loop does (n // max_length windows)
    assert len(covered) == (n // max_length) * max_length or n < max_length


@pytest.mark.parametrize("protocol", ["sliding", "disjoint"])
def test_bos_starts_every_window_and_is_never_scored(ids, protocol):
    bos, stride = 0, 20 if protocol == "sliding" else None
    windows = make_windows(len(ids), 48, stride, protocol, prefix_token=bos)
    for w in windows:
        fed, _, positions, targets = batch_inputs(ids, [w])
        assert fed[0, 0] == bos and fed.shape[1] == w.length <= 48
        assert positions.min() >= 1  # BOS's own position predicts a context token, never a target
        assert torch.equal(fed[0, positions + 1], targets)  # each target is the next token fed
    # the convention picks the fed and scored text tokens as without BOS, in windows one token shorter
    assert [(w.begin, w.end, w.first_target, w.stop) for w in windows] == \
        [(w.begin, w.end, w.first_target, w.stop) for w in make_windows(len(ids), 47, stride, protocol)]


@torch.no_grad()
def test_bos_perplexity_is_the_model_fed_bos_before_each_window(model, ids):
    bos, total, count = 0, 0.0, 0
    for w in make_windows(len(ids), 48, None, "disjoint", prefix_token=bos):
        fed = torch.cat([torch.tensor([bos]), ids[w.begin:w.end]]).unsqueeze(0)
        logits = model(input_ids=fed).logits[0].float()
        # fed position p + 1 is text token w.begin + p; the first text token is context
        nll = F.cross_entropy(logits[1:-1], ids[w.begin + 1:w.end], reduction="sum")
        total, count = total + nll.item(), count + w.end - w.begin - 1
    got = perplexity(model, ids, 48, None, progress=False, protocol="disjoint", prefix_token=bos)
    assert got.tokens == count
    assert got.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sliding_is_the_default_and_unchanged(model, ids):
    assert make_windows(len(ids), 48, 20) == sliding_windows(len(ids), 48, 20)
    assert perplexity(model, ids, 48, 20, progress=False) == perplexity(model, ids, 48, 20, progress=False,
                                                                       protocol="sliding")


def test_protocol_reaches_the_results_file_sidecar_and_model_card(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    main.main(["--mode", "custom", "--remove", "1", "--model", str(model_dir), "--dataset", str(text_file),
               "--max-tokens", "300", "--max-length", "64", "--protocol", "disjoint", "--bos", "--no-speed",
               "--save_results", "--output-dir", str(out), "--save-model", str(tmp_path / "pruned"), "--quiet"])
    [path] = out.glob("*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["protocol"] for r in rows] == ["disjoint+bos"] * 2
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["config"]["windows"]["protocol"] == "disjoint" and sidecar["config"]["windows"]["bos"] is True
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "non-overlapping windows of 64 tokens" in card and "BOS token" in card
    assert "--protocol disjoint --bos" in card and "--stride" not in card.split("```bash")[1]


@pytest.mark.parametrize("args, message", [
    (["--protocol", "disjoint", "--stride", "8"], "--stride is only used by --protocol sliding"),
    (["--protocol", "lm-eval", "--bos"], "--bos does not apply to --protocol lm-eval"),
])
def test_options_a_protocol_does_not_read_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main.main(["--mode", "baseline", *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_every_protocol_has_help_and_a_card_sentence():
    assert list(PROTOCOLS) == ["sliding", "disjoint", "lm-eval"]
    assert all(c.help and c.sentence for c in PROTOCOLS.values())
