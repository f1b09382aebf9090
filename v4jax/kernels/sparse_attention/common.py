"""Pieces shared by the Pallas backends: input padding and the online-softmax math.

The online softmax is the reference's blocked softmax (`reference.py`) carried as a running
state per head instead of materialised scores:

    m   running max of the scores seen so far, without the sink    [H, 1] fp32
    l   sum of the unrounded probabilities, rescaled to m           [H, 1] fp32
    acc sum of bf16-rounded probabilities times rows, rescaled to m [H, D] fp32

Per 64-entry block: m' = max(m, max_j s_j); p_j = exp(s_j - m'); rescale l and acc by
exp(m - m'); l += sum p; acc += round(p) . rows. At the end o = acc / (l + exp(sink - m)).
The product of the per-block rescales telescopes to the reference's `exp(m_block - m_final)`
factor, so the two differ only in fp32 summation order. A max that is still -inf (no valid
entry yet) is replaced by 0 where it is subtracted, as in the reference: the probabilities of
such a block are all 0 and a query with no valid entry returns 0 (the sink alone).
`log_sum_exp` is the statistic the backward needs (`reference_bwd.py`): log(l + exp(sink - m))
+ m, the sink included; a query with no valid entry gets the sink.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["HI", "pad_inputs", "scores", "online_update", "finish", "log_sum_exp"]

HI = jax.lax.Precision.HIGHEST  # fp32 operands: true fp32 (not tf32); bf16 operands: bf16 MMA
_NT = (((1,), (1,)), ((), ()))  # [M, D] x [N, D] -> [M, N]
_NN = (((1,), (0,)), ((), ()))  # [M, N] x [N, D] -> [M, D]


def pad_inputs(q, idx, sink, *, heads: int, rows: int):
    """Pad heads to a multiple of `heads` (zero queries, sink 0: finite, sliced off after) and
    the index list to a multiple of `rows` (with -1, which the kernels skip)."""
    h, k = q.shape[2], idx.shape[2]
    hp, kp = -(-h // heads) * heads, -(-k // rows) * rows
    q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0)))
    idx = jnp.pad(idx.astype(jnp.int32), ((0, 0), (0, 0), (0, kp - k)), constant_values=-1)
    sink = jnp.pad(sink.astype(jnp.float32), (0, hp - h))
    return q, idx, sink


def scores(q, rows, valid, scale: float):
    """[H, D] x [R, D] -> [H, R] fp32 scaled scores; -inf where the entry is not valid."""
    s = jax.lax.dot_general(q, rows, _NT, precision=HI, preferred_element_type=jnp.float32)
    return jnp.where(valid, s * jnp.float32(scale), -jnp.inf)


def _drop_inf(m):
    return jnp.where(m == -jnp.inf, 0.0, m)


def online_update(m, l, acc, s, rows, dtype):
    """One 64-entry block: s [H, 64] fp32 masked scores, rows [64, D] -> the new (m, l, acc)."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_sub = _drop_inf(m_new)
    alpha = jnp.exp(m - m_sub)  # 0 while m is -inf (acc and l are 0 then)
    p = jnp.exp(s - m_sub)  # [H, 64], 0 at masked entries
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    pv = jax.lax.dot_general(
        p.astype(dtype), rows, _NN, precision=HI, preferred_element_type=jnp.float32
    )  # probabilities rounded to the query dtype, fp32 accumulation (official kernel)
    return m_new, l, alpha * acc + pv


def finish(m, l, acc, sink):
    """o = acc / (l + exp(sink - m)); sink [H, 1] fp32 logits. Rows with no entry give 0."""
    return acc / (l + jnp.exp(sink - _drop_inf(m)))


def log_sum_exp(m, l, sink):
    """[H, 1] fp32: m + log(l + exp(sink - m)) with the same -inf -> 0 rule as `finish`."""
    m = _drop_inf(m)
    return m + jnp.log(l + jnp.exp(sink - m))
