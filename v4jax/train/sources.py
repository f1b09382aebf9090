"""Training sources: local files indexed into documents, with one-line errors up front.

Each path is a file, a directory (its files, recursively, sorted; hidden names skipped) or a
glob pattern (matches sorted):
- a `.jsonl` file: one document per non-blank line, detected per line:
  `{"text": "..."}` (pretraining text) or `{"messages": [...], "thinking": false}` (chat SFT;
  every message form of the official format (`v4jax.chat`: system / developer / user /
  assistant / tool roles, tools, DSML tool calls, `reasoning_content`); `thinking` (optional,
  default false) selects the thinking-mode format);
- any other file: plain UTF-8 text, the whole file one document (`.txt`, `.md`, `.py`, ...).

`load_corpus` reads every file once and raises `DataError` with one line naming `FILE` or
`FILE:LINE` for missing paths, empty files, non-UTF-8 bytes and malformed JSON or records, so
bad data fails before anything is tokenized or compiled. Only byte offsets are kept; the
pipeline reads and tokenizes documents lazily (`data.py`).
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from v4jax.eval.data import DataError
from v4jax.tokenizer import format_chat

__all__ = ["Corpus", "DataError", "DocKind", "load_corpus"]


class DocKind(enum.IntEnum):
    TEXT_FILE = 0  # a whole file of plain text
    TEXT = 1  # a jsonl "text" record
    CHAT = 2  # a jsonl "messages" record


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """The documents of some local files, as offsets (nothing tokenized or held in memory).
    Arrays are indexed by document: file index, byte range [start, end), line (0 for a whole
    file) and `DocKind`."""

    files: tuple[str, ...]
    file: np.ndarray
    start: np.ndarray
    end: np.ndarray
    line: np.ndarray
    kind: np.ndarray

    def __len__(self) -> int:
        return len(self.file)

    def where(self, i: int) -> str:
        path, line = self.files[self.file[i]], int(self.line[i])
        return f"{path}:{line}" if line else path

    def read(self, i: int) -> str | dict[str, Any]:
        """Document i: its text (plain text) or its parsed jsonl record."""
        with open(self.files[self.file[i]], "rb") as f:
            f.seek(int(self.start[i]))
            raw = f.read(int(self.end[i] - self.start[i])).decode("utf-8")
        return raw if self.kind[i] == DocKind.TEXT_FILE else json.loads(raw)


def load_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> Corpus:
    """Index and check the documents of `paths` (see the module docstring for the formats)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [f for p in paths for f in _expand(os.fspath(p))]
    if not files:
        raise DataError("no data paths given")
    rows: list[tuple[int, int, int, int, int]] = []
    for fi, path in enumerate(files):
        n = len(rows)
        if path.endswith(".jsonl"):
            rows.extend((fi, *r) for r in _scan_jsonl(path))
        else:
            rows.append((fi, 0, _check_text_file(path), 0, DocKind.TEXT_FILE))
        if len(rows) == n:
            raise DataError(f"{path}: no documents (only blank lines)")
    file, start, end, line, kind = np.array(rows, np.int64).T
    return Corpus(tuple(files), file, start, end, line, kind)


def _expand(path: str) -> list[str]:
    if glob.has_magic(path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise DataError(f"{path}: no files match")
        return [f for m in matches for f in _expand(m)]
    if os.path.isdir(path):
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.join(root, n) for n in names if not n.startswith(".")]
        if not found:
            raise DataError(f"{path}: directory holds no files")
        return sorted(found)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory")
    return [path]


def _check_text_file(path: str) -> int:
    """The file's size, after checking that it is non-empty UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise DataError(f"{path}: empty file")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    return len(raw)


def _scan_jsonl(path: str):
    """(start, end, line, kind) of each record of a jsonl file, each record checked."""
    with open(path, "rb") as f:
        offset = 0
        for n, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {e.start} of the line)") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            yield start, offset, n, _record_kind(obj, where)


def _record_kind(obj: Any, where: str) -> DocKind:
    if not isinstance(obj, dict) or ("text" in obj) == ("messages" in obj):
        raise DataError(f'{where}: expected an object with either "text" or "messages"')
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f'{where}: "text" must be a string')
        return DocKind.TEXT
    msgs, thinking = obj["messages"], obj.get("thinking", False)
    if not isinstance(msgs, list):
        raise DataError(f'{where}: "messages" must be a list')
    if not isinstance(thinking, bool):
        raise DataError(f'{where}: "thinking" must be true or false')
    try:
        format_chat(msgs, thinking=thinking, add_generation_prompt=False)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(m.get("role") == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn, so nothing to train on")
    return DocKind.CHAT
