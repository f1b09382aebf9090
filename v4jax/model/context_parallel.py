"""Context parallelism for V4 attention (V4 report §3.5: two-stage compressed attention).

Under sharding rules whose "length" maps to mesh axes (TRAIN: `context`), the sequence is split
into contiguous shards: shard i holds tokens [i s, (i + 1) s). Everything token-wise (the query,
K = V and compressor projections, norms, RoPE, the output projection) runs under GSPMD on the
sequence-sharded activations; the sequence-mixing core runs in one `shard_map`, where shard i:

1. Window: receives the previous shard's last W - 1 K = V rows (one `ppermute`), so every
   query's sliding-window rows are local.
2. Stage 1, compression: entry j pools tokens [j r, (j + 1) r) and belongs to the shard holding
   its last token, so shard i owns entries floor(i s / r) .. floor((i + 1) s / r) - 1: at most
   s // r + 1, the fixed slot count (unused slots are padding). The tokens its first block (and,
   for the overlapping ratio-4 compressor, the block before that) lack arrive in one `ppermute`
   of the previous shard's last m projected rows (m = r, or 2r overlapping). Each shard pools,
   norms, ropes and quantises its own slots.
3. Stage 2: the slots are all-gathered (S / r entries: small) and put in global entry order by
   one static gather, so each query shard scores (indexer top-k) and attends over every earlier
   entry exactly as the unsharded layer does, same rows in the same order.

No full-length K = V is gathered. Per layer and per device (`traffic`), for B_l rows: forward
B_l (W - 1) K window rows, per compressor B_l m 2w projected rows (kv and gate; w its width)
and an all-gather of cp (s // r + 1) entries; the backward sends the same rows back (ppermute
transposes to ppermute) and reduce-scatters the entries' gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sharding import constraints
from v4jax.model import remat
from v4jax.model.indexer import entry_visible

__all__ = ["attention", "check_lengths", "traffic"]

F32 = jnp.float32


def _needs(attn) -> list[tuple[str, int]]:
    """(what, tokens) each shard must receive from its predecessor: the window's W - 1 rows,
    each compressor's m rows."""
    out = [("the sliding window", attn.cfg.window_size - 1)]
    for name, comp in (("the compressor", attn.compressor), ("the indexer", _ixc(attn))):
        if comp is not None:
            out.append((f"{name} (ratio {comp.ratio})", _tail(comp)))
    return out


def _tail(comp) -> int:
    """Projected rows a compressor takes from the previous shard: r, or 2r overlapping."""
    return comp.ratio * (2 if comp.overlap else 1)


def _ixc(attn):
    return None if attn.indexer is None else attn.indexer.compressor


def check_lengths(attn, length: int, shards: int) -> int:
    """Tokens per shard s = length / shards; a clear error unless it divides and each shard's
    predecessor alone holds every boundary token the shard needs."""
    if length % shards:
        raise ValueError(
            f"context parallelism: sequence length {length} is not divisible by the {shards} "
            "context shards"
        )
    s = length // shards
    for what, m in _needs(attn):
        if s < m:
            raise ValueError(
                f"context parallelism: {s} tokens per shard ({length} over {shards}) are fewer "
                f"than the {m} boundary tokens {what} needs from the previous shard; use longer "
                "sequences or fewer context shards"
            )
    return s


def traffic(
    attn, batch: int, length: int, shards: int, *, backward: bool = True, indexer_grad=True
) -> dict[str, int]:
    """Bytes of the collectives' results per device for one layer, by HLO collective kind
    (what `sharding.train_plan.collective_bytes` counts); `batch`: rows per device.

    Forward: collective-permute of the window's W - 1 K = V rows and of each compressor's m
    projected kv and gate rows (float32); all-gather of each compressor's shards x slots
    entries. The backward sends the same rows back (collective-permute) and reduce-scatters
    the entries' gradient (one shard's slots); `indexer_grad` False: the indexer's top-k
    carries no gradient (stage "off"), so its keys have no backward."""
    s = check_lengths(attn, length, shards)
    act = jnp.dtype(attn.prec.dtype).itemsize
    fwd = bwd = batch * (attn.cfg.window_size - 1) * attn.cfg.head_dim * act
    gather = scatter = 0
    for comp in (attn.compressor, _ixc(attn)):
        if comp is None:
            continue
        has_grad = comp is attn.compressor or indexer_grad
        m = _tail(comp)
        rows = batch * m * 2 * comp.wkv.weight.shape[0] * 4
        entries = batch * (s // comp.ratio + 1) * comp.head_dim * act
        fwd, gather = fwd + rows, gather + shards * entries
        bwd, scatter = bwd + rows * has_grad, scatter + entries * has_grad
    if not backward:
        bwd = scatter = 0
    return {"collective-permute": fwd + bwd, "all-gather": gather, "reduce-scatter": scatter}


def _from_previous(x, ctx, shards):
    """Shard i's `x` arrives at shard i + 1 (shard 0 receives zeros)."""
    return jax.lax.ppermute(x, ctx, perm=[(k, k + 1) for k in range(shards - 1)])


def _order(length: int, s: int, r: int, slots: int) -> np.ndarray:
    """Static positions of entries 0 .. length // r - 1 in the gathered [shards x slots]."""
    j = np.arange(length // r)
    owner = ((j + 1) * r - 1) // s
    return (owner * slots + j - (owner * s) // r).astype(np.int32)


def _compress(comp, kv, score, *, ctx, shards, length):
    """Stage 1 and 2 for one compressor: local projections kv, gate logits [b, s, w] -> every
    entry of the sequence [b, length // r, K], in order."""
    b, s, w = kv.shape
    r = comp.ratio
    m = _tail(comp)
    slots = s // r + 1
    i = jax.lax.axis_index(ctx)
    tail_kv = _from_previous(kv[:, s - m :], ctx, shards)
    tail_sc = _from_previous(score[:, s - m :], ctx, shards)
    tail_sc = jnp.where(i == 0, -jnp.inf, tail_sc)  # before token 0: the absent block
    pad = jnp.zeros((b, slots * r, w), kv.dtype)  # rows of the unused slots
    ext_kv = jnp.concatenate([tail_kv, kv, pad], axis=1)  # row e: token i s - m + e
    ext_sc = jnp.concatenate([tail_sc, score, pad], axis=1)
    first = (i * s) // r  # the shard's first entry
    lead = r if comp.overlap else 0  # the block before it
    start = first * r - i * s + m - lead
    blocks = slots + (1 if comp.overlap else 0)
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, blocks * r, axis=1).reshape(
        b, blocks, r, w
    )
    pooled = comp.pool_blocks(cut(ext_kv), cut(ext_sc) + comp.ape[...], leading=comp.overlap)
    pos = jnp.broadcast_to((first + jnp.arange(slots, dtype=jnp.int32)) * r, (b, slots))
    entries = comp.finish(pooled, pos)
    every = jax.lax.all_gather(entries, ctx, axis=1, tiled=True)  # [b, shards x slots, K]
    return jnp.take(every, _order(length, s, r, slots), axis=1)


def attention(attn, u: jnp.ndarray, stage: str, ctx: tuple[str, ...]):
    """`Attention.forward_train` with the sequence split over mesh axes `ctx`: same values,
    u [B, S, D] -> (output [B, S, D], (indexer KL summed over queries, queries))."""
    cfg, ix = attn.cfg, attn.indexer
    b, length, _ = u.shape
    shards = constraints.axis_size(ctx)
    s = check_lengths(attn, length, shards)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    qr, q = attn.queries(u, pos)
    args = {"q": q, "kv": attn.window_kv(u, pos)}
    if attn.ratio:
        args["c"] = attn.compressor.project(u)
    if ix is not None:  # training stages: the indexer reads detached inputs
        ui, qi = (u, qr) if stage == "off" else (jax.lax.stop_gradient(a) for a in (u, qr))
        args["ic"] = ix.compressor.project(ui)
        args["iq"] = ix.queries(qi, pos)
        args["iw"] = ix.head_weights(ui)
    bat = constraints.mesh_axes("batch", b)
    manual = (*bat, *ctx)
    window = cfg.window_size
    gather = dict(ctx=ctx, shards=shards, length=length)

    def body(a):
        i = jax.lax.axis_index(ctx)
        q, kv = a["q"], a["kv"]
        bl = q.shape[0]
        g = i * s + jnp.arange(s)  # global positions of the local queries
        buf = jnp.concatenate([_from_previous(kv[:, s - (window - 1) :], ctx, shards), kv], 1)
        rows = jnp.maximum(g - window + 1, 0)[:, None] + jnp.arange(min(length, window))[None]
        win = jnp.where(rows > g[:, None], -1, rows - i * s + window - 1)  # rows of `buf`
        idx, pool = jnp.broadcast_to(win, (bl, *win.shape)), buf
        kl = (jnp.zeros((), F32), jnp.zeros((), F32))
        if attn.ratio:
            entries = _compress(attn.compressor, *a["c"], **gather)
            n = entries.shape[1]
            vis = jnp.broadcast_to(entry_visible(g, n, attn.ratio), (bl, s, n))
            every = jnp.where(vis, jnp.arange(n), -1)
            comp, scores = every, None
            if ix is not None and n:
                keys = _compress(ix.compressor, *a["ic"], **gather)
                if stage == "dense":  # KL over every visible entry: their scores
                    sc = ix.weighted_scores(a["iw"], a["iq"], keys)
                    scores = jnp.take_along_axis(sc, jnp.maximum(every, 0), axis=-1)
                else:  # the top-k, and for the KL their scores
                    comp, picked = ix.pick(a["iw"], a["iq"], keys, g, attn.ratio)
                    scores = None if stage == "off" else picked
            idx = jnp.concatenate([idx, jnp.where(comp >= 0, comp + buf.shape[1], -1)], axis=-1)
            pool = jnp.concatenate([pool, entries], axis=1)
            if scores is not None:
                kl = jax.lax.psum(attn._indexer_kl(q, pool, idx, comp, scores), manual)
        q, pool = remat.name(q, "attn_q"), remat.name(pool, "attn_kv")
        return attn.attend(q, pool, idx.astype(jnp.int32)), kl

    tok = lambda x: P(bat or None, ctx, *(None,) * (x.ndim - 2))
    run = constraints.shard_map(
        body,
        in_specs=(jax.tree.map(tok, args),),
        out_specs=(P(bat or None, ctx, None, None), (P(), P())),
    )
    o, kl = run(args)
    return remat.name(attn.project(o, pos), "attn_out"), kl
