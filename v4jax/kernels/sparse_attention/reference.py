"""Pure-jnp sparse MQA with an attention sink: the specification of the sparse-attention op.

Every query token attends to an index set of rows of a shared K = V pool (its sliding window
and its compressed entries; reference `Attention.forward`). The rounding follows the
official `sparse_attn_kernel`: scores in float32, an online softmax over 64-wide blocks of the
index list whose running max excludes the sink, probabilities rounded to the query dtype
before the P.V product, float32 row sums of the unrounded probabilities, and the sink adding
`exp(sink - max)` to the denominator only.

`reference_forward` also returns the log-sum-exp of each softmax (sink included), the one
statistic the backward (`reference_bwd.py`) needs; the output is the same computation.

Memory: the specification gathers each query's rows [B, S, K, D] in float32. Query rows are
independent, so both directions run `chunk_size` queries at a time (a loop over chunks, the
rows of one chunk at most `ROW_BUDGET` elements), which gives the same values row for row; a
long sequence then needs one chunk's rows, not the whole sequence's (V4-Flash at 8K queries
per device, K = 640, D = 512: 10.7 GB of float32 rows at once, 0.5 GB per chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sparse_attention_reference", "reference_forward", "ROW_BUDGET", "chunk_size"]

_HI = jax.lax.Precision.HIGHEST

# Elements of one query chunk's gathered rows [B, c, K, D] (512 MiB of float32).
ROW_BUDGET = 1 << 27


def chunk_size(b: int, s: int, k: int, d: int) -> int:
    """Queries per chunk: all S when the rows fit `ROW_BUDGET`, else as many as fit (>= 1)."""
    return max(1, min(s, ROW_BUDGET // max(1, b * k * d)))


def to_chunks(a: jnp.ndarray, c: int, fill=0) -> jnp.ndarray:
    """[B, S, ...] -> [m, B, c, ...], S padded with `fill` to m * c."""
    b, s = a.shape[:2]
    m = -(-s // c)
    pad = [(0, 0), (0, m * c - s)] + [(0, 0)] * (a.ndim - 2)
    a = jnp.pad(a, pad, constant_values=fill)
    return jnp.moveaxis(a.reshape(b, m, c, *a.shape[2:]), 1, 0)


def from_chunks(a: jnp.ndarray, s: int) -> jnp.ndarray:
    """[m, B, c, ...] -> [B, S, ...] (the padding dropped)."""
    m, b, c = a.shape[:3]
    return jnp.moveaxis(a, 0, 1).reshape(b, m * c, *a.shape[3:])[:, :s]


def sparse_attention_reference(
    q: jnp.ndarray,  # [B, S, H, D]
    kv: jnp.ndarray,  # [B, N, D] shared key = value rows
    idx: jnp.ndarray,  # [B, S, K] int32 rows of kv per query, -1 = none
    sink: jnp.ndarray,  # [H] float32 logits
    *,
    scale: float,
    block: int = 64,
) -> jnp.ndarray:  # [B, S, H, D] in q.dtype
    return reference_forward(q, kv, idx, sink, scale=scale, block=block)[0]


def reference_forward(
    q: jnp.ndarray,  # [B, S, H, D]
    kv: jnp.ndarray,  # [B, N, D]
    idx: jnp.ndarray,  # [B, S, K] int32, -1 = none
    sink: jnp.ndarray,  # [H]
    *,
    scale: float,
    block: int = 64,
) -> tuple[jnp.ndarray, jnp.ndarray]:  # o [B, S, H, D] in q.dtype, lse [B, S, H] float32
    """The reference forward and log(sum_j exp(s_j) + exp(sink)) per (token, head); a query
    with no valid entry gets lse = sink (its denominator is the sink alone). Runs
    `chunk_size` queries at a time (padded queries have no entry and are dropped)."""
    b, s, _, d = q.shape
    c = chunk_size(b, s, idx.shape[-1], d)
    rows = lambda q, idx: _forward_rows(q, kv, idx, sink, scale=scale, block=block)
    if c == s:
        return rows(q, idx)
    o, lse = jax.lax.map(lambda x: rows(*x), (to_chunks(q, c), to_chunks(idx, c, -1)))
    return from_chunks(o, s), from_chunks(lse, s)


def _forward_rows(q, kv, idx, sink, *, scale: float, block: int):
    b, s, h, d = q.shape
    k = idx.shape[-1]
    valid = idx >= 0
    rows = jnp.take_along_axis(kv[:, None], jnp.maximum(idx, 0)[..., None], axis=2)  # [B,S,K,D]
    rows = jnp.where(valid[..., None], rows.astype(jnp.float32), 0.0)
    scores = jnp.einsum("bshd,bskd->bshk", q.astype(jnp.float32), rows, precision=_HI)
    scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf) * jnp.float32(scale)
    nb = -(-k // block)
    scores = jnp.pad(scores, ((0, 0),) * 3 + ((0, nb * block - k),), constant_values=-jnp.inf)
    sb = scores.reshape(b, s, h, nb, block)
    m_run = jax.lax.cummax(jnp.max(sb, axis=-1), axis=3)  # [B,S,H,nb] running max, no sink
    m_fin = m_run[..., -1:]
    safe = lambda m: jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no valid key: all-zero p
    factor = jnp.exp(safe(m_run) - safe(m_fin))
    p = jnp.exp(sb - safe(m_run)[..., None])
    p_cast = p.astype(q.dtype).astype(jnp.float32)
    denom = jnp.sum(jnp.sum(p, axis=-1) * factor, axis=-1)
    denom = denom + jnp.exp(sink.astype(jnp.float32) - safe(m_fin[..., 0]))
    w = (p_cast * factor[..., None]).reshape(b, s, h, nb * block)[..., :k]
    o = jnp.einsum("bshk,bskd->bshd", w, rows, precision=_HI) / denom[..., None]
    return o.astype(q.dtype), safe(m_fin[..., 0]) + jnp.log(denom)
