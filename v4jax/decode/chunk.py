"""One forward over a chunk of new tokens per sequence, reading and updating the cache.

Each sequence b continues at its own position p_b = cache.pos[b] with n_b valid tokens of the
right-padded chunk [B, S] (prefill: S tokens, decode: S = 1). This single path serves one-shot
prefill, chunked prefill from any position (which the official reference cannot do) and
decode. Per layer (reference `Attention.forward`):

* the attention pool is [ring buffer (window rows) | chunk rows (S) | compressed entries];
  each query's window is positions max(0, t-W+1) .. t, oldest first (the reference's order),
  read from the ring (positions < p_b) or the chunk;
* compressor: the kept raw projections (state) and the chunk's form one buffer; every block
  completed inside the chunk is pooled into a new entry before attention, so a block completed
  by token t is visible to t itself;
* the ring, the entries and the compressor state are updated with the valid tokens only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.decode.cache import CompressorState, DecodeCache, LayerCache
from v4jax.model.attention import Attention
from v4jax.model.block import Block
from v4jax.model.compressor import Compressor
from v4jax.model.transformer import Transformer

__all__ = ["forward_chunk"]


def _take_rows(buf: jax.Array, rows: jax.Array) -> jax.Array:
    """buf [B, N, W], rows [B, ...] (clipped into range) -> [B, ..., W]."""
    b = buf.shape[0]
    flat = jnp.clip(rows, 0, buf.shape[1] - 1).reshape(b, -1)
    out = jnp.take_along_axis(buf, flat[..., None], axis=1)
    return out.reshape(*rows.shape, buf.shape[-1])


def compress_chunk(comp: Compressor, u, p0, n, state: CompressorState):
    """-> new entries [B, J, c], their indices [B, J] (-1 if not completed), new state."""
    r, s = comp.ratio, u.shape[1]
    kept = 2 if comp.overlap else 1
    kv, score = comp.project(u)  # [B, S, W] float32
    t = p0[:, None] + jnp.arange(s)
    score = score + comp.ape[...][t % r]
    buf_kv = jnp.concatenate([state.kv, kv], axis=1)
    buf_sc = jnp.concatenate([state.score, score], axis=1)
    base = (p0 // r - (kept - 1)) * r  # position of state row 0

    def gather(pos):  # absolute positions [B, ...] -> (kv, score) with absent ones masked
        row = jnp.where(
            pos < p0.reshape(-1, *[1] * (pos.ndim - 1)),
            pos - base.reshape(-1, *[1] * (pos.ndim - 1)),
            kept * r + pos - p0.reshape(-1, *[1] * (pos.ndim - 1)),
        )
        ok = (pos >= 0)[..., None]
        return (
            jnp.where(ok, _take_rows(buf_kv, row), 0.0),
            jnp.where(ok, _take_rows(buf_sc, row), -jnp.inf),
        )

    j = s // r + 1
    e = p0[:, None] // r + jnp.arange(j)  # [B, J] candidate entries
    blk = e[..., None] * r + jnp.arange(r)  # [B, J, r]
    cur_kv, cur_sc = gather(blk)
    if comp.overlap:
        c = comp.head_dim
        prev_kv, prev_sc = gather(blk - r)
        pool_kv = jnp.concatenate([prev_kv[..., :c], cur_kv[..., c:]], axis=2)
        pool_sc = jnp.concatenate([prev_sc[..., :c], cur_sc[..., c:]], axis=2)
    else:
        pool_kv, pool_sc = cur_kv, cur_sc
    pooled = jnp.sum(pool_kv * jax.nn.softmax(pool_sc, axis=2), axis=2)  # [B, J, c]
    done = (e + 1) * r <= (p0 + n)[:, None]
    pooled = jnp.where(done[..., None], pooled, 0.0)  # incomplete blocks: no NaN, discarded
    entries = comp.finish(pooled, e * r)
    q = p0 + n
    new_pos = ((q // r - (kept - 1)) * r)[:, None] + jnp.arange(kept * r)
    nkv, nsc = gather(new_pos)
    present = (new_pos < q[:, None])[..., None]
    new_state = CompressorState(jnp.where(present, nkv, 0.0), jnp.where(present, nsc, -jnp.inf))
    return entries, jnp.where(done, e, -1), new_state


def _scatter_rows(cache: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """cache [B, N, K]; rows [B, J] (-1 or >= N: skipped); values [B, J, K]."""
    b = cache.shape[0]
    rows = jnp.where(rows < 0, cache.shape[1], rows)
    bi = jnp.broadcast_to(jnp.arange(b)[:, None], rows.shape)
    return cache.at[bi, rows].set(values.astype(cache.dtype), mode="drop")


def _window_idx(p0, s: int, w: int):
    """Window rows of the pool [B, S, W] (ring rows < W, chunk rows W + i), -1 where absent."""
    t = p0[:, None] + jnp.arange(s)  # [B, S]
    wpos = jnp.maximum(t - w + 1, 0)[..., None] + jnp.arange(w)  # oldest first
    p = p0[:, None, None]
    row = jnp.where(wpos < p, wpos % w, w + wpos - p)
    return jnp.where(wpos <= t[..., None], row, -1)


def attention_chunk(attn: Attention, u, p0, n, lc: LayerCache):
    w = attn.cfg.window_size
    b, s, _ = u.shape
    pos = p0[:, None] + jnp.arange(s)
    qr, q = attn.queries(u, pos)
    kv = attn.window_kv(u, pos)
    pool = [lc.window, kv.astype(lc.window.dtype)]
    idx = _window_idx(p0, s, w)
    if attn.ratio:
        new, rows, comp_state = compress_chunk(attn.compressor, u, p0, n, lc.compressor)
        entries = _scatter_rows(lc.entries, rows, new)
        c = entries.shape[1]
        visible = jnp.arange(c) < ((pos + 1) // attn.ratio)[..., None]  # [B, S, C]
        lc = dataclasses.replace(lc, entries=entries, compressor=comp_state)
        if attn.indexer is not None:
            ix = attn.indexer
            knew, krows, kstate = compress_chunk(ix.compressor, u, p0, n, lc.index_compressor)
            keys = _scatter_rows(lc.index_keys, krows, knew)
            lc = dataclasses.replace(lc, index_keys=keys, index_compressor=kstate)
            comp = ix(u, qr, pos, keys, visible)
        else:
            comp = jnp.where(visible, jnp.arange(c), -1)
        idx = jnp.concatenate([idx, jnp.where(comp >= 0, comp + w + s, -1)], axis=-1)
        pool.append(entries)
    out = attn.output(q, jnp.concatenate(pool, axis=1), idx.astype(jnp.int32), pos)
    # ring update: the last min(n, W) valid tokens of the chunk
    i = jnp.arange(s)[None, :]
    keep = (i < n[:, None]) & (i >= n[:, None] - w)
    slots = jnp.where(keep, pos % w, -1)
    return out, dataclasses.replace(lc, window=_scatter_rows(lc.window, slots, kv))


def block_chunk(blk: Block, x, ids, p0, n, lc: LayerCache):
    y, post, comb = blk.hc_attn.pre(x)
    a, lc = attention_chunk(blk.attn, blk.attn_norm(y), p0, n, lc)
    x = blk.hc_attn.post(a, x, post, comb)
    y, post, comb = blk.hc_ffn.pre(x)
    return blk.hc_ffn.post(blk.ffn(blk.ffn_norm(y), ids), x, post, comb), lc


@nnx.scan(in_axes=(nnx.Carry, 0, 0, None, None, None), out_axes=(nnx.Carry, 0))
def _scan_unit(x, unit, caches, ids, p0, n):
    new = []
    for blk, lc in zip(unit.blocks, caches, strict=True):
        x, lc = block_chunk(blk, x, ids, p0, n, lc)
        new.append(lc)
    return x, tuple(new)


def forward_chunk(model: Transformer, ids: jax.Array, cache: DecodeCache, lengths: jax.Array):
    """ids [B, S] (right-padded), lengths [B] valid tokens -> logits of each sequence's last
    valid token [B, V] float32 and the updated cache."""
    p0, n = cache.pos, lengths.astype(jnp.int32)
    e = model.embed_tokens(ids)
    x = jnp.broadcast_to(e[:, :, None, :], (*e.shape[:2], model.cfg.hc_mult, e.shape[-1]))
    layers = []
    for unit, caches in zip(model.segments, cache.layers, strict=True):
        x, caches = _scan_unit(x, unit, caches, ids, p0, n)
        layers.append(caches)
    last = jnp.take_along_axis(x, jnp.maximum(n - 1, 0)[:, None, None, None], axis=1)
    logits = model.head(model.norm(model.hc_head(last)))[:, 0]
    return logits, DecodeCache(p0 + n, tuple(layers), cache.max_len)
