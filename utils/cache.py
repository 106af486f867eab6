"""Token ids cached on disk, so a second run on the same text skips loading
and tokenizing it (WikiText-2's test split takes a noticeable while to load and
tokenize, and it is the same every run).

An entry is keyed by everything that determines the ids: the tokenizer's full
definition (vocabulary, merges, normalizer and special-token handling, or its
vocabulary for a tokenizer without a serialized form) and the dataset's
identity: a local file's content hash and text column, or a Hub dataset's name,
split and text column. Changing any of them makes a new entry; a damaged entry
is ignored and rewritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from utils.data import is_local_dataset, load_text, tokenize

log = logging.getLogger("gpt2-pruning-kit")

# Bump when load_text or tokenize change what they produce for the same inputs.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "gpt2-pruning-kit"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (backend.to_str() if backend is not None
                  else json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{definition}".encode()).hexdigest()


def file_hash(path: str) -> str:
    """SHA-256 of a file's bytes. The token cache and --resume's run identity both ask for it, so it is
    computed once per file version (path, size and modification time) in a process."""
    stat = os.stat(path)
    return _file_hash(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_identity(dataset: str, split: str, text_column: str) -> dict:
    if is_local_dataset(dataset) and os.path.isfile(dataset):
        return {"file_sha256": file_hash(dataset), "suffix": Path(dataset).suffix.lower(), "column": text_column}
    return {"hub": dataset, "split": split, "column": text_column}


def cache_key(tokenizer, dataset: str, split: str, text_column: str) -> str:
    key = {"version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
           "dataset": dataset_identity(dataset, split, text_column)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cached_token_ids(tokenizer, dataset: str, split: str, text_column: str,
                     cache_dir: str | Path | None) -> torch.Tensor:
    """The dataset's text as one stream of token ids (utils.data), from the cache when it holds them.

    ``cache_dir`` None disables the cache. A file that does not exist is left
    to load_text, which raises the kit's usual error for it.
    """
    if cache_dir is None or (is_local_dataset(dataset) and not os.path.isfile(dataset)):
        return tokenize(tokenizer, load_text(dataset, split, text_column))
    path = Path(cache_dir).expanduser() / f"tokens-{cache_key(tokenizer, dataset, split, text_column)}.pt"
    if path.is_file():
        try:
            ids = torch.load(path, weights_only=True)
            log.debug(f"Token ids of {dataset} read from the cache ({path})")
            return ids
        except Exception as exc:  # a truncated or foreign file: rebuild it
            log.warning(f"ignoring unreadable token cache {path}: {exc}")
    ids = tokenize(tokenizer, load_text(dataset, split, text_column))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(ids, partial)
        os.replace(partial, path)
    except OSError as exc:  # a read-only home should not stop a run
        log.warning(f"could not write the token cache {path}: {exc}")
    return ids
