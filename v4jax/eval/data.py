"""Reading evaluation files: jsonl records with line numbers, field checks, clear errors.

Every problem in a file raises `DataError` with a one-line message `FILE:LINE: problem`, so a
bad record in a large file is found without a debugger. Blank lines are skipped; line numbers
count every physical line from 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["DataError", "read_jsonl", "field", "token_ids", "text_tokenizer"]


class DataError(ValueError):
    """A bad evaluation file or record; the message names the file and line."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a jsonl file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """obj[name], which must exist and be of `kind` (bool is not an int here)."""
    if name not in obj:
        raise DataError(f"{where}: missing field {name!r}")
    v = obj[name]
    if isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise DataError(f"{where}: field {name!r} must be {_kind(kind)}, got a boolean")
    if not isinstance(v, kind):
        raise DataError(f"{where}: field {name!r} must be {_kind(kind)}, got {type(v).__name__}")
    return v


def token_ids(value: Any, what: str, vocab_size: int, where: str) -> np.ndarray:
    """A non-empty list of token ids in [0, vocab_size) -> int32 array."""
    ok = isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )
    if not ok:
        raise DataError(f"{where}: {what} must be a list of integer token ids")
    if not value:
        raise DataError(f"{where}: {what} is empty")
    a = np.asarray(value, np.int64)
    if a.min() < 0 or a.max() >= vocab_size:
        raise DataError(
            f"{where}: {what} has ids in [{a.min()}, {a.max()}], outside the model's "
            f"vocabulary [0, {vocab_size})"
        )
    return a.astype(np.int32)


def text_tokenizer(tokenizer, vocab_size: int, where: str):
    """The tokenizer for a text field, or a DataError saying why text cannot be used."""
    if tokenizer is None:
        raise DataError(
            f"{where}: text records need the V4 tokenizer, which this model's vocabulary "
            f"({vocab_size}) does not match; use the pre-tokenized fields"
        )
    if tokenizer.vocab_size != vocab_size:
        raise DataError(
            f"{where}: the tokenizer's vocabulary ({tokenizer.vocab_size}) is not the model's "
            f"({vocab_size})"
        )
    return tokenizer


def _kind(kind) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)
