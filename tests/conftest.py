"""Shared fixtures: a tiny GPT-2 with one exact identity block, its own
tokenizer, and text, all saved to disk the way a user would have them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import main  # noqa: E402
from tiny import make_model, make_text, make_tokenizer, save_model_dir  # noqa: E402

N_LAYER = 4
IDENTITY_BLOCK = 2


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread, like each process of the distributed tests (OMP_NUM_THREADS=1): tiny
    models gain nothing from intra-op threads, and on a busy machine their hand-offs made the
    suite several times slower. Summation order then also matches across processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def private_token_cache(tmp_path_factory):
    """Keep the tests' token-cache entries out of the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    # matplotlib builds its font cache there on first import and logs that it did: once, here, so that no
    # test's subprocess prints it
    subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], check=True, capture_output=True)
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def text() -> str:
    return make_text()


@pytest.fixture(scope="session")
def tokenizer(text):
    return make_tokenizer(text)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, text) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """4 blocks; block 2 adds exactly zero to the residual stream."""
    model = make_model(n_layer=N_LAYER, vocab_size=len(tokenizer), identity=(IDENTITY_BLOCK,))
    return save_model_dir(tmp_path_factory.mktemp("model"), model, tokenizer)


@pytest.fixture
def model(tokenizer):
    return make_model(n_layer=N_LAYER, vocab_size=len(tokenizer), identity=(IDENTITY_BLOCK,))


def kit(model_dir, text_file, *args: str, out=None) -> int:
    """The command line on a saved model and a text file, as a user would type it; with ``out``, a results
    CSV there. Returns the exit status (argument errors raise SystemExit(2), as from a shell)."""
    argv = ["--model", str(model_dir), "--dataset", str(text_file), *args]
    if out is not None:
        argv += ["--save_results", "--output-dir", str(out)]
    return main.main(argv)


def only_csv(folder: Path) -> Path:
    """The one results CSV a run wrote into ``folder``."""
    files = list(Path(folder).glob("*.csv"))
    assert len(files) == 1, files
    return files[0]


def quick(max_tokens: int, *more: str) -> list[str]:
    """Options that keep a test run short: no speed test, the first ``max_tokens`` tokens."""
    return ["--no-speed", "--max-tokens", str(max_tokens), *more]


def results_of(folder: Path):
    """The rows of the one results CSV in ``folder``, as a user would load them."""
    import pandas as pd

    return pd.read_csv(only_csv(folder))
