"""Evaluation text: the Hub's WikiText-2 by default, or a local file."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from utils.errors import OFFLINE_HINT, KitError, first_line

if TYPE_CHECKING:  # pandas and torch load when text is read, not when main.py checks its arguments
    import torch

# Short names for the configurations of the Hub's "wikitext" dataset.
WIKITEXT_CONFIGS = ("wikitext-2-raw-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-103-v1")
# Table files: suffix -> pandas reader and its keyword arguments.
TABLE_READERS = {".csv": ("read_csv", {}), ".json": ("read_json", {}), ".jsonl": ("read_json", {"lines": True}),
                 ".parquet": ("read_parquet", {})}
LOCAL_SUFFIXES = (".txt", *TABLE_READERS)


def is_local_dataset(name: str) -> bool:
    return os.path.exists(name) or name.lower().endswith(LOCAL_SUFFIXES)


def check_local_dataset(name: str, option: str = "--dataset") -> None:
    """Refuse a local path the kit cannot read, before any model loads (a Hub name passes)."""
    if not is_local_dataset(name):
        return
    if not os.path.isfile(name):
        raise KitError(f"{option} file '{name}' does not exist")
    if os.path.splitext(name)[1].lower() not in LOCAL_SUFFIXES:
        raise KitError(f"{option} file '{name}' has an unknown type (choices: {', '.join(LOCAL_SUFFIXES)}); "
                       "a plain text file needs the .txt suffix")


def _local_texts(path: str, text_column: str) -> list[str]:
    if not os.path.isfile(path):
        raise KitError(f"dataset file '{path}' does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        try:
            with open(path, encoding="utf-8") as f:
                return [f.read()]
        except UnicodeDecodeError as exc:
            raise KitError(f"dataset file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if suffix not in TABLE_READERS:
        raise KitError(f"dataset file '{path}' has an unknown type (choices: {', '.join(LOCAL_SUFFIXES)})")
    import pandas as pd

    reader, kwargs = TABLE_READERS[suffix]
    try:
        table = getattr(pd, reader)(path, **kwargs)
    except Exception as exc:  # malformed files raise many different errors
        raise KitError(f"cannot read dataset file '{path}': {first_line(exc)}") from None
    if text_column not in table.columns:
        raise KitError(f"dataset file '{path}' has no column '{text_column}' "
                       f"(columns: {', '.join(map(str, table.columns))}); choose one with --text-column")
    return [str(t) for t in table[text_column].dropna()]


def _hub_texts(name: str, split: str, text_column: str) -> list[str]:
    import datasets

    path, config = ("wikitext", name) if name in WIKITEXT_CONFIGS else (name.partition(":")[0], name.partition(":")[2] or None)
    try:
        data = datasets.load_dataset(path, config, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise KitError(f"dataset '{name}' has no split '{split}': {first_line(exc)}") from None
        raise KitError(f"cannot load dataset '{name}': {first_line(exc)}; {OFFLINE_HINT}") from None
    except Exception as exc:  # connection, missing-dataset and cache errors
        raise KitError(f"cannot load dataset '{name}': {first_line(exc)}; {OFFLINE_HINT}") from None
    if text_column not in data.column_names:
        raise KitError(f"dataset '{name}' has no column '{text_column}' "
                       f"(columns: {', '.join(data.column_names)}); choose one with --text-column")
    return list(data[text_column])


def load_text(name: str, split: str = "test", text_column: str = "text") -> str:
    """The evaluation text as one string.

    Records are joined with blank lines, as the transformers perplexity guide
    does for WikiText, so that the model sees paragraph breaks between them.
    """
    texts = _local_texts(name, text_column) if is_local_dataset(name) else _hub_texts(name, split, text_column)
    text = "\n\n".join(texts)
    if not text.strip():
        raise KitError(f"dataset '{name}' contains no text")
    return text


def tokenize(tokenizer, text: str, what: str = "the evaluation text", min_tokens: int = 2) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids."""
    import torch

    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    if len(ids) < min_tokens:
        raise KitError(f"{what} is shorter than {min_tokens} token{'s' if min_tokens > 1 else ''}")
    return torch.tensor(ids, dtype=torch.long)
