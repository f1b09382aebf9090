"""Forward passes for speculative decoding (V3 report §5.4.3): a chunk forward that
returns the final streams of every position, a verify forward that leaves the cache untouched,
a commit that writes any per-sequence prefix of a verified chunk, and the MTP block on a cache.

Why verify and commit are separate: the main model checks k drafts in one chunk, but how many
of them it keeps is known only after that chunk's logits. Every cache update a chunk makes
(`chunk.attention_chunk`: the sliding-window ring, the compressed entries of blocks completed
inside the chunk, the compressor's pending state, the indexer's keys and state) is a function
of the attention input u of each layer, the start position, the number n of tokens to keep and
the cache before the chunk, nothing else. `verify_forward` runs the chunk with every token
valid (so each query sees the entries that its own prefix completes) and returns u of each
layer; `commit` then calls the same `attention_chunk` on the unchanged cache with
per-sequence lengths n = tokens kept. u at a kept position depends only on tokens up to it
(causality), so it is the u a chunk of only the kept tokens computes, and the committed cache
is what `forward_chunk(..., lengths=n)` gives: a rejected draft leaves no ring row, no
compressed entry and no pending compressor row behind. The commit computes no attention
output (dead code that XLA removes): only the window, compressor and indexer projections of
the kept tokens, a small fraction of a layer.

The MTP block (reference `MTPBlock`) is an r = 0 block, so its cache is one window ring
(`LayerCache`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.decode.cache import DecodeCache, LayerCache
from v4jax.decode.chunk import _scan_unit, attention_chunk, block_chunk
from v4jax.model.layers import F32
from v4jax.model.transformer import Transformer

__all__ = [
    "commit",
    "forward_streams",
    "last_logits",
    "mtp_chunk",
    "mtp_head",
    "stream_logits",
    "verify_forward",
]


def _embed(model: Transformer, ids: jax.Array) -> jax.Array:
    e = model.embed_tokens(ids)  # [B, S, D] -> streams [B, S, N, D]
    return jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], model.cfg.hc_mult, e.shape[-1]))


def forward_streams(model: Transformer, ids, cache: DecodeCache, lengths):
    """`forward_chunk` returning the final streams of every position [B, S, N, D] (before
    hc_head; the MTP block's input) instead of the last logits, and the updated cache."""
    p0, n = cache.pos, lengths.astype(jnp.int32)
    x, layers = _embed(model, ids), []
    for unit, caches in zip(model.segments, cache.layers, strict=True):
        x, caches = _scan_unit(x, unit, caches, ids, p0, n)
        layers.append(caches)
    return x, DecodeCache(p0 + n, tuple(layers), cache.max_len)


def last_logits(model: Transformer, x, lengths) -> jax.Array:
    """Logits [B, V] of each sequence's last valid position, as `forward_chunk` computes them."""
    last = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None, None], axis=1)
    return model.head(model.norm(model.hc_head(last)))[:, 0]


def stream_logits(model: Transformer, x) -> jax.Array:
    """Streams [B, S, N, D] -> logits [B, S, V] float32."""
    return model.head(model.norm(model.hc_head(x)))


@nnx.scan(in_axes=(nnx.Carry, 0, 0, None, None, None), out_axes=(nnx.Carry, 0))
def _verify_unit(x, unit, caches, ids, p0, n):
    us = []
    for blk, lc in zip(unit.blocks, caches, strict=True):  # `chunk.block_chunk`, keeping u
        y, post, comb = blk.hc_attn.pre(x)
        u = blk.attn_norm(y)
        a, _ = attention_chunk(blk.attn, u, p0, n, lc)  # the updated cache is dropped
        x = blk.hc_attn.post(a, x, post, comb)
        y, post, comb = blk.hc_ffn.pre(x)
        x = blk.hc_ffn.post(blk.ffn(blk.ffn_norm(y), ids), x, post, comb)
        us.append(u)
    return x, tuple(us)


def verify_forward(model: Transformer, ids, cache: DecodeCache):
    """All S tokens of ids [B, S] valid from each sequence's cache position -> (streams
    [B, S, N, D], attention inputs u: per segment, per block of its unit, [R, B, S, D]).
    The cache is read, not written."""
    n = jnp.full(ids.shape[:1], ids.shape[1], jnp.int32)
    x, us = _embed(model, ids), []
    for unit, caches in zip(model.segments, cache.layers, strict=True):
        x, u = _verify_unit(x, unit, caches, ids, cache.pos, n)
        us.append(u)
    return x, tuple(us)


@nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, None, None), out_axes=(nnx.Carry, 0))
def _commit_unit(carry, unit, caches, us, p0, n):
    new = tuple(
        attention_chunk(blk.attn, u, p0, n, lc)[1]
        for blk, lc, u in zip(unit.blocks, caches, us, strict=True)
    )
    return carry, new


def commit(model: Transformer, cache: DecodeCache, us, lengths) -> DecodeCache:
    """The cache after the first lengths[b] tokens of the chunk `verify_forward` saw (its u)."""
    n, layers = lengths.astype(jnp.int32), []
    for unit, caches, u in zip(model.segments, cache.layers, us, strict=True):
        _, caches = _commit_unit(jnp.zeros((), jnp.int32), unit, caches, u, cache.pos, n)
        layers.append(caches)
    return DecodeCache(cache.pos + n, tuple(layers), cache.max_len)


def mtp_chunk(model: Transformer, streams, ids, lc: LayerCache, p0, n):
    """The MTP block over a chunk: streams [B, S, N, D] (the main model's final streams at
    positions p0 + i, or the block's own output when chaining) and ids [B, S] (the token at
    p0 + i + 1) -> (block output streams [B, S, N, D], cache with the first n rows written).
    The input is `MTPBlock.forward_train`'s: e_proj(enorm(emb)) + h_proj(hnorm(streams))."""
    mtp = model.mtp
    emb = model.embed_tokens(ids)
    x = mtp.e_proj(mtp.enorm(emb))[:, :, None, :].astype(F32)
    x = (x + mtp.h_proj(mtp.hnorm(streams)).astype(F32)).astype(emb.dtype)
    return block_chunk(mtp.block, x, ids, p0, n.astype(jnp.int32), lc)


def mtp_head(model: Transformer, x) -> jax.Array:
    """MTP block output streams [B, S, N, D] -> logits [B, S, V] (own norm and hc_head, the
    shared head)."""
    return model.head(model.mtp.norm(model.mtp.hc_head(x)))
