"""Saving and restoring decode caches (shared-prefix reuse, e.g. a long system prompt), and
cache memory accounting.

A saved cache is a folder with `cache.npz` (plain arrays, loaded with `allow_pickle=False`)
and `cache.json` (the cache's tree structure, dtypes, and a fingerprint of the model config
and numerics it was computed with). Restoring into a model with another fingerprint fails
with a message naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from v4jax.config import Attn, ModelConfig, to_dict
from v4jax.decode.cache import DecodeCache

__all__ = ["cache_bytes", "load_cache", "measured_bytes", "save_cache"]


def _fingerprint(model) -> dict:
    cfg = json.dumps(to_dict(model.config), sort_keys=True)
    return {
        "config_sha256": hashlib.sha256(cfg.encode()).hexdigest(),
        "numerics": model.precision.numerics.value,
        "dtype": str(model.precision.dtype),
    }


def save_cache(path: str | os.PathLike, cache: DecodeCache, model) -> None:
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    leaves = jax.tree.leaves(cache)
    arrays, dtypes = {}, []
    for i, leaf in enumerate(leaves):
        a = np.asarray(leaf)
        dtypes.append(a.dtype.name)
        arrays[f"a{i}"] = a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a
    meta = {
        "fingerprint": _fingerprint(model),
        "batch_size": cache.batch_size,
        "max_len": cache.max_len,
        "dtypes": dtypes,
    }
    np.savez(os.path.join(path, "cache.npz"), **arrays)
    with open(os.path.join(path, "cache.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_cache(path: str | os.PathLike, model) -> DecodeCache:
    path = os.fspath(path)
    try:
        with open(os.path.join(path, "cache.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no cache.json (not a saved decode cache)") from None
    want, got = _fingerprint(model), meta["fingerprint"]
    for key in want:
        if want[key] != got.get(key):
            raise ValueError(
                f"{path}: cache was computed with {key}={got.get(key)!r}, "
                f"this model has {want[key]!r}"
            )
    template = model.init_cache(meta["batch_size"], meta["max_len"])
    with np.load(os.path.join(path, "cache.npz"), allow_pickle=False) as z:
        leaves = []
        for i, (t, name) in enumerate(zip(jax.tree.leaves(template), meta["dtypes"], strict=True)):
            a = z[f"a{i}"]
            a = a.view(ml_dtypes.bfloat16) if name == "bfloat16" else a
            if a.shape != t.shape:
                raise ValueError(f"{path}: array {i} has shape {a.shape}, expected {t.shape}")
            leaves.append(jnp.asarray(a))
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def cache_bytes(cfg: ModelConfig, context: int, dtype=jnp.bfloat16) -> dict[str, float]:
    """Cache memory of one sequence: bytes per token of context (compressed entries, which
    grow with the context) and totals at `context` tokens, including the fixed windows and
    compressor states. In the reference's bf16 layout Flash grows by 6,880 B / token."""
    item = jnp.dtype(dtype).itemsize
    per_token = fixed = 0.0
    for r in cfg.layer_ratios:
        fixed += cfg.window_size * cfg.head_dim * item
        if r:
            per_token += cfg.head_dim * item / r
            fixed += (2 if r == 4 else 1) * r * (2 if r == 4 else 1) * cfg.head_dim * 4 * 2
        if r == Attn.CSA:
            per_token += cfg.index_head_dim * item / 4
            fixed += 8 * 2 * cfg.index_head_dim * 4 * 2
    return {"per_token": per_token, "fixed": fixed, "total": per_token * context + fixed}


def measured_bytes(cache: DecodeCache) -> int:
    """Bytes actually held by a cache pytree (all sequences)."""
    return sum(x.nbytes for x in jax.tree.leaves(cache))
