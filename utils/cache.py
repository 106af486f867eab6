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


# The files of a model folder that decide what the model computes on the evaluated text: its config, its
# tokenizer and its weights (a model card, a pruning report or a generation config do not).
MODEL_FILE_NAMES = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def model_fingerprint(path: str, cache_dir: str | Path | None = None) -> str:
    """SHA-256 over the names and contents of a local model's config, tokenizer and weight files (or of a
    single file, a .gguf), so that a model is known by what it is, not by the path it was given as.

    The weights of a large model take a while to hash: with ``cache_dir`` each file's hash is kept on disk,
    keyed by its path, size, inode and modification time, so later runs on the same files skip it.
    """
    if os.path.isfile(path):
        files = [path]
    else:
        named = [os.path.join(path, n) for n in os.listdir(path)
                 if n in MODEL_FILE_NAMES or n.endswith(WEIGHT_SUFFIXES)]
        files = sorted(f for f in named if os.path.isfile(f))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{os.path.basename(file)}\0{stored_file_hash(file, cache_dir)}\n".encode())
    return digest.hexdigest()


def stored_file_hash(path: str, cache_dir: str | Path | None) -> str:
    """file_hash, kept in ``cache_dir`` (None: computed in this process only)."""
    if cache_dir is None:
        return file_hash(path)
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_ino}\0{stat.st_mtime_ns}".encode())
    entry = Path(cache_dir).expanduser() / "file-hashes" / key.hexdigest()
    try:
        known = entry.read_text(encoding="ascii").strip()
        if len(known) == 64:
            return known
    except (OSError, UnicodeDecodeError):
        pass
    value = file_hash(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(value, encoding="ascii")
        os.replace(partial, entry)
    except OSError as exc:  # a read-only home should not stop a run
        log.warning(f"could not keep the hash of {path} in {entry.parent}: {exc}")
    return value


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
