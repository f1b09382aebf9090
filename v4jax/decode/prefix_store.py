"""The prefix cache's storage: content-addressed records in a RAM tier over an optional disk
tier, each with its own LRU byte budget (the V4 report's on-disk KV cache, §3.6).

A record is a list of arrays (one prefix block's compressed entries, and optionally the
decode state at the block's end) under a hex key (a chain hash, `v4jax.decode.prefix`).
On disk a record is one file `<key>.v4pc`:

    magic b"V4PC1\\n" | sha256 of the rest (32 bytes) | header length (8 bytes, little endian)
    | header (JSON: dtype name and shape of each array) | the arrays' bytes, C order

Safety: a file is written under a temporary name in the same folder and renamed (atomic on
POSIX), so another process sees either no file or a complete one; the checksum is verified on
every read and a truncated, corrupt or foreign file is removed and counted, never used; no
pickle anywhere (the header is JSON, arrays are raw bytes). A failed write (full disk,
read-only folder) is counted in `stats()["write_errors"]` and leaves the cache usable.
Recency on disk is the file's mtime (touched on every hit), so processes sharing a folder
share one LRU order; each process evicts down to its own `disk_bytes` budget.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import struct
import time
import uuid

import ml_dtypes
import numpy as np

__all__ = ["PrefixCache", "decode_record", "encode_record"]

MAGIC = b"V4PC1\n"
SUFFIX = ".v4pc"
_TMP = ".tmp-"
_STALE_TMP_S = 600.0  # a temporary file this old belongs to a writer that died
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}


def encode_record(arrays: list[np.ndarray]) -> bytes:
    header = json.dumps([[a.dtype.name, list(a.shape)] for a in arrays]).encode()
    body = (
        struct.pack("<Q", len(header))
        + header
        + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    )
    return MAGIC + hashlib.sha256(body).digest() + body


def decode_record(blob: bytes) -> list[np.ndarray]:
    """-> arrays; ValueError for anything but a complete, intact record."""
    if len(blob) < len(MAGIC) + 40 or not blob.startswith(MAGIC):
        raise ValueError("not a prefix-cache record")
    digest, body = blob[len(MAGIC) : len(MAGIC) + 32], blob[len(MAGIC) + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch (truncated or corrupt)")
    (n,) = struct.unpack("<Q", body[:8])
    try:
        spec = json.loads(body[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"bad header: {e}") from None
    out, at = [], 8 + n
    for name, shape in spec:
        dt = np.dtype(_DTYPES.get(name, name))
        size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        if at + size > len(body):
            raise ValueError("payload shorter than its header")
        out.append(np.frombuffer(body, dt, size // dt.itemsize, at).reshape(shape))
        at += size
    if at != len(body):
        raise ValueError("payload longer than its header")
    return out


class PrefixCache:
    """Automatic prefix cache for `v4jax.generate(..., prefix_cache=pc)`.

    `path=None`: RAM only. `ram_bytes` / `disk_bytes`: LRU budgets of the two tiers (records
    read from disk are promoted to RAM). `window_every`: the decode state at a block's end (the
    sliding-window ring and the compressors' pending rows, needed to resume there) is stored
    every `window_every` tokens and at the last complete block of every request; the
    compressed entries are stored for every block (`v4jax.decode.prefix` explains the
    policy). `block_tokens`: the hashed block length, a multiple of every compression ratio
    (default: the smallest such multiple >= 128; 128 for the presets). `compact`: store K = V
    rows as FP8 nope dims + rope dims where that is lossless (reference numerics;
    `v4jax.decode.prefix_pack`).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        ram_bytes: int = 1 << 30,
        disk_bytes: int = 16 << 30,
        window_every: int | None = None,
        block_tokens: int | None = None,
        compact: bool = False,
    ):
        for name, v in (("ram_bytes", ram_bytes), ("disk_bytes", disk_bytes)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}: must be an int >= 0")
        for name, v in (("window_every", window_every), ("block_tokens", block_tokens)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r}: must be an int >= 1")
        self.path = None if path is None else os.fspath(path)
        self.ram_bytes, self.disk_bytes = ram_bytes, disk_bytes
        self.window_every, self.block_tokens = window_every, block_tokens
        self.compact = bool(compact)
        self._ram: collections.OrderedDict[str, tuple[list[np.ndarray], int]] = (
            collections.OrderedDict()
        )
        self._ram_used = 0
        self._stats = collections.Counter()
        self._fingerprints: list = []  # [(weakrefs to a model's leaves, fingerprint)]
        if self.path is not None:
            if os.path.exists(self.path) and not os.path.isdir(self.path):
                raise ValueError(f"prefix cache path {self.path} exists and is not a folder")
            os.makedirs(self.path, exist_ok=True)
            self._remove_stale_tmp()
        # bytes on disk as this process last saw them plus what it wrote since: the folder is
        # scanned (and the LRU files evicted) only when this exceeds the budget, not per write
        self._disk_est = sum(s for _, s, _ in self._disk_files())

    # ---------------------------------------------------------------- statistics

    def stats(self) -> dict:
        """Cumulative counters of this object: `hit_tokens` (prompt tokens restored from the
        cache), `prefill_tokens` (prompt tokens computed), `lookups`, `hit_requests`,
        `stored_blocks`, `stored_bytes`, `ram_hits`, `disk_hits`, `evictions`,
        `bad_records` (corrupt or foreign files removed), `write_errors`; and the bytes now
        held: `ram_used`, `disk_used` (this cache's folder, all processes)."""
        out = {k: 0 for k in (
            "hit_tokens", "prefill_tokens", "lookups", "hit_requests", "stored_blocks",
            "stored_bytes", "ram_hits", "disk_hits", "evictions", "bad_records", "write_errors",
        )}  # fmt: skip
        out.update(self._stats)
        out["ram_used"] = self._ram_used
        out["disk_used"] = sum(s for _, s, _ in self._disk_files())
        return out

    def count(self, **counts: int) -> None:
        self._stats.update(counts)

    # ---------------------------------------------------------------- records

    def has(self, key: str) -> bool:
        return key in self._ram or (self.path is not None and os.path.exists(self._file(key)))

    def get(self, key: str) -> list[np.ndarray] | None:
        """The record under `key` (promoted to most recent), or None."""
        if key in self._ram:
            self._ram.move_to_end(key)
            self._stats["ram_hits"] += 1
            return self._ram[key][0]
        if self.path is None:
            return None
        f = self._file(key)
        try:
            with open(f, "rb") as fh:
                blob = fh.read()
        except OSError:  # absent, or evicted by another process meanwhile
            return None
        try:
            arrays = decode_record(blob)
        except ValueError:
            self._stats["bad_records"] += 1
            self._remove(f)
            return None
        try:
            os.utime(f)
        except OSError:
            pass
        self._stats["disk_hits"] += 1
        self._put_ram(key, arrays, len(blob))
        return arrays

    def put(self, key: str, arrays: list[np.ndarray], *, replace: bool = False) -> None:
        """Stores a record (`replace`: over an existing file of that key, e.g. a record
        without decode state by one with it)."""
        blob = encode_record(arrays)
        self._stats["stored_blocks"] += 1
        self._stats["stored_bytes"] += len(blob)
        self._put_ram(key, [np.array(a) for a in arrays], len(blob))
        if self.path is not None and self.disk_bytes > 0:
            self._write(key, blob, replace)

    def discard(self, key: str) -> None:
        """Removes a record found unusable (e.g. shapes of another model): counted as bad."""
        self._stats["bad_records"] += 1
        if key in self._ram:
            self._ram_used -= self._ram.pop(key)[1]
        if self.path is not None:
            self._remove(self._file(key))

    def clear(self) -> None:
        """Drops every record (RAM, and this cache's files on disk)."""
        self._ram.clear()
        self._ram_used = 0
        for f, _, _ in self._disk_files():
            self._remove(f)

    # ---------------------------------------------------------------- tiers

    def _put_ram(self, key: str, arrays: list[np.ndarray], size: int) -> None:
        if key in self._ram:
            self._ram_used -= self._ram.pop(key)[1]
        if size > self.ram_bytes:
            return
        self._ram[key] = (arrays, size)
        self._ram_used += size
        while self._ram_used > self.ram_bytes:
            _, (_, s) = self._ram.popitem(last=False)
            self._ram_used -= s
            self._stats["evictions"] += 1

    def _file(self, key: str) -> str:
        return os.path.join(self.path, key + SUFFIX)

    def _write(self, key: str, blob: bytes, replace: bool) -> None:
        final = self._file(key)
        if not replace and os.path.exists(final):
            return
        tmp = os.path.join(self.path, f"{_TMP}{os.getpid()}-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, final)
        except OSError:
            self._stats["write_errors"] += 1
            self._remove(tmp)
            return
        self._disk_est += len(blob)
        if self._disk_est > self.disk_bytes:
            self._evict_disk()

    def _disk_files(self) -> list[tuple[str, int, float]]:
        if self.path is None:
            return []
        out = []
        with os.scandir(self.path) as it:
            for e in it:
                if e.name.endswith(SUFFIX):
                    try:
                        st = e.stat()
                    except OSError:
                        continue
                    out.append((e.path, st.st_size, st.st_mtime))
        return out

    def _evict_disk(self) -> None:
        files = self._disk_files()
        used = sum(s for _, s, _ in files)
        for f, s, _ in sorted(files, key=lambda t: t[2]):
            if used <= self.disk_bytes:
                break
            self._remove(f)
            used -= s
            self._stats["evictions"] += 1
        self._disk_est = used

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        with os.scandir(self.path) as it:
            for e in it:
                if e.name.startswith(_TMP):
                    try:
                        if now - e.stat().st_mtime > _STALE_TMP_S:
                            os.remove(e.path)
                    except OSError:
                        pass

    @staticmethod
    def _remove(f: str) -> None:
        try:
            os.remove(f)
        except OSError:
            pass
