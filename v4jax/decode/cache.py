"""Decode state: V4's heterogeneous per-layer cache, with per-sequence positions.

Per layer (as in the reference): a `window`-slot ring buffer of raw K = V rows (position p lives in
slot p mod window) in every layer; in compressed layers (r > 0) the compressed entries (one per
r tokens) and the compressor's pending raw projections (`CompressorState`: the current,
incomplete block and, for the overlapping r = 4 compressor, the previous block); in CSA layers
the indexer's compressed keys and its own compressor state. The cache mirrors the model's
segments: one `LayerCache` per block of a segment's unit, stacked on a leading repeats axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.config import Attn, ModelConfig, layer_plan

__all__ = ["CompressorState", "DecodeCache", "LayerCache", "init_cache"]


def _pytree(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class CompressorState:
    """Raw projections of the tokens of the kept blocks (2 for r = 4, 1 for r = 128).

    Row j holds position `(pos // r - (blocks - 1)) * r + j` of its sequence (pos = the
    sequence's next position); rows of absent positions hold kv 0 and score -inf.
    """

    kv: jax.Array  # [B, blocks * r, W] float32
    score: jax.Array  # [B, blocks * r, W] float32 gate logits + ape


@_pytree
class LayerCache:
    window: jax.Array  # [B, window, K] ring buffer of raw K = V rows
    entries: jax.Array | None = None  # [B, max_len // r, K] compressed entries (r > 0)
    compressor: CompressorState | None = None
    index_keys: jax.Array | None = None  # [B, max_len // 4, index_head_dim] (CSA)
    index_compressor: CompressorState | None = None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["pos", "layers"],
    meta_fields=["max_len"],
    drop_fields=["host_pos"],
)
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    pos: jax.Array  # [B] int32 next position of each sequence (= tokens seen so far)
    layers: tuple  # per segment: tuple (per block of the unit) of stacked LayerCache
    max_len: int  # static: positions 0 .. max_len - 1 fit
    # A host copy of `pos` kept by `prefill` / `decode_step` so that checking a step against
    # `max_len` needs no device-to-host transfer. Not part of the pytree (a cache coming out of
    # a jitted function has None here; the next step then reads `pos` once).
    host_pos: np.ndarray | None = dataclasses.field(default=None, compare=False)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]


def _compressor_state(b: int, ratio: int, width: int) -> CompressorState:
    rows = (2 if ratio == 4 else 1) * ratio
    return CompressorState(
        kv=jnp.zeros((b, rows, width), jnp.float32),
        score=jnp.full((b, rows, width), -jnp.inf, jnp.float32),
    )


def _layer_cache(cfg: ModelConfig, attn: Attn, b: int, max_len: int, dtype) -> LayerCache:
    k, r = cfg.head_dim, int(attn)
    window = jnp.zeros((b, cfg.window_size, k), dtype)
    if r == 0:
        return LayerCache(window)
    width = (2 if r == 4 else 1) * k
    entries = jnp.zeros((b, max_len // r, k), dtype)
    comp = _compressor_state(b, r, width)
    if attn is not Attn.CSA:
        return LayerCache(window, entries, comp)
    ik = cfg.index_head_dim
    keys = jnp.zeros((b, max_len // 4, ik), dtype)
    return LayerCache(window, entries, comp, keys, _compressor_state(b, 4, 2 * ik))


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> DecodeCache:
    """An empty cache for `batch_size` sequences of at most `max_len` tokens each."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size={batch_size}, max_len={max_len}: both must be >= 1")
    layers = []
    for seg in layer_plan(cfg):
        unit = tuple(_layer_cache(cfg, k.attn, batch_size, max_len, dtype) for k in seg.kinds)
        reps = seg.repeats
        layers.append(jax.tree.map(lambda a, r=reps: jnp.broadcast_to(a, (r, *a.shape)), unit))
    pos = jnp.zeros((batch_size,), jnp.int32)
    return DecodeCache(pos, tuple(layers), max_len, np.zeros((batch_size,), np.int32))
