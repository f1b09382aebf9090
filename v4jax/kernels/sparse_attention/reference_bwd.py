"""Pure-jnp backward of the sparse-attention op: the specification of its gradients.

Per query token and head (notation of `reference.py`), with s_j the
scaled score of index entry j, v_j = k_j = kv[idx_j] (K = V) and L the forward's log-sum-exp
over the valid entries and the sink:

    P_j  = exp(s_j - L)                P_sink = exp(sink - L)       (the softmax, sink included)
    o    = sum_j P_j v_j               (the sink carries no value)
    dP_j = g . v_j                     Delta = g . o  (= sum_j P_j dP_j)
    dS_j = P_j (dP_j - Delta)
    dq   = scale sum_j dS_j k_j
    dkv[idx_j] += scale dS_j q + P_j g        (a scatter-add: K = V, the same row gets both)
    dsink = -sum over tokens of P_sink Delta

Entries of -1 have P_j = 0 and send nothing; an entry repeated in an index list adds once per
occurrence; a query with no valid entry has P_sink = 1, o = 0 and zero gradients except dsink
(which is 0 too: Delta = g . 0).

Statistics: the forward saves L ([B, S, H] float32, 4 bytes per token and head) rather than
the backward recomputing it. With L the backward is one pass over the index list with exactly
normalised probabilities and no running max; recomputing would cost a second sweep of every
gathered row and score product (the forward's work again) to save a few bytes. The forward's
64-entry online-softmax blocks (`blocks.py`) only decide where its probabilities are rounded
for the P.V product; L does not depend on them beyond float32 summation order.

Rounding (the backward's own, mirrored by the kernels): scores, P, dP, dS, Delta and all
accumulation in float32; P and dS rounded to the input dtype where they enter a product
(dq = dS.K, dkv = dS^T.Q + P^T.dO), as FlashAttention-2 and the DeepSeek V3.2 sparse-MLA
backward (tilelang examples) do; the scale applied in float32 after those products. The
forward's rounding of P to bf16 before P.V is not differentiated (the gradient is the exact
softmax's, as `jax.grad` of the reference also treats that cast as the identity). In float32
every rounding is a no-op and this is the exact gradient.

Delta comes from the saved output in its dtype (as in FlashAttention-2): the residual is the
bf16 output the next layer keeps anyway. The cost, measured against the float64 gradient
(`tests/test_sparse_attention_grad.py`): where a softmax is peaked, dP_j - Delta cancels for
its top entry and Delta's bf16 rounding shows; dq's l2 error grows from 2.6e-3 (the final bf16
rounding) to at most 9.2e-3, dsink's from ~1e-7 to ~3e-3. A float32 output residual (2 more
bytes per output element) would remove it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.kernels.sparse_attention.reference import chunk_size, from_chunks, to_chunks

__all__ = ["backward_stats", "round_to", "sparse_attention_reference_bwd"]

_HI = jax.lax.Precision.HIGHEST


def round_to(x: jnp.ndarray, dtype) -> jnp.ndarray:
    """float32 x rounded to `dtype`'s precision, kept float32. `reduce_precision`, not a
    round trip through `dtype`: XLA may drop a convert pair (`xla_allow_excess_precision`; it
    does so on CPU when the output of the reference forward only feeds Delta)."""
    if jnp.dtype(dtype) == jnp.float32:
        return x
    fi = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def backward_stats(o, g, sink, lse):
    """Delta [B, S, H] = g . o (float32) and dsink [H] = -sum_{B,S} exp(sink - lse) Delta.

    Shared by every implementation: both are elementwise over the output (XLA fuses them). o
    is the saved output, rounded to its dtype (as a kernel writes it) whatever XLA fuses."""
    o = round_to(o.astype(jnp.float32), o.dtype)
    delta = jnp.sum(o * g.astype(jnp.float32), axis=-1)
    p_sink = jnp.exp(sink.astype(jnp.float32)[None, None, :] - lse)  # [B, S, H]
    return delta, -jnp.sum(p_sink * delta, axis=(0, 1)).astype(sink.dtype)


def sparse_attention_reference_bwd(
    q: jnp.ndarray,  # [B, S, H, D]
    kv: jnp.ndarray,  # [B, N, D]
    idx: jnp.ndarray,  # [B, S, K] int32, -1 = none
    lse: jnp.ndarray,  # [B, S, H] float32, from the forward
    delta: jnp.ndarray,  # [B, S, H] float32, `backward_stats`
    g: jnp.ndarray,  # [B, S, H, D] cotangent of the output
    *,
    scale: float,
) -> tuple[jnp.ndarray, jnp.ndarray]:  # dq [B, S, H, D] q.dtype, dkv [B, N, D] kv.dtype
    """Runs `chunk_size` queries at a time (as the forward), adding each chunk's rows into
    one float32 dkv; padded queries have no entry and send nothing."""
    b, s, _, d = q.shape
    c = chunk_size(b, s, idx.shape[-1], d)
    dkv = jnp.zeros(kv.shape, jnp.float32)
    if c == s:
        dkv, dq = _rows(dkv, (q, idx, lse, delta, g), kv, scale)
        return dq, dkv.astype(kv.dtype)
    xs = (to_chunks(q, c), to_chunks(idx, c, -1), to_chunks(lse, c), to_chunks(delta, c))
    step = lambda acc, x: _rows(acc, x, kv, scale)
    dkv, dq = jax.lax.scan(step, dkv, (*xs, to_chunks(g, c)))
    return from_chunks(dq, s), dkv.astype(kv.dtype)


def _rows(dkv, xs, kv, scale: float):
    """One chunk of queries: (dkv + its scatter-add, its dq)."""
    q, idx, lse, delta, g = xs
    b, n, _ = kv.shape
    f32, dt = jnp.float32, q.dtype
    rnd = lambda x: round_to(x, dt)  # a product operand in the input dtype
    valid = idx >= 0
    rows = jnp.take_along_axis(kv[:, None], jnp.maximum(idx, 0)[..., None], axis=2)  # [B,S,K,D]
    rows = jnp.where(valid[..., None], rows.astype(f32), 0.0)
    qf, gf = q.astype(f32), g.astype(f32)
    s = jnp.einsum("bshd,bskd->bshk", qf, rows, precision=_HI) * jnp.float32(scale)
    p = jnp.where(valid[:, :, None, :], jnp.exp(s - lse[..., None]), 0.0)  # [B, S, H, K]
    dp = jnp.einsum("bshd,bskd->bshk", gf, rows, precision=_HI)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("bshk,bskd->bshd", rnd(ds), rows, precision=_HI) * jnp.float32(scale)
    c = jnp.einsum("bshk,bshd->bskd", rnd(ds), qf, precision=_HI) * jnp.float32(scale)
    c = c + jnp.einsum("bshk,bshd->bskd", rnd(p), gf, precision=_HI)  # [B, S, K, D]
    # Scatter-add in float32 (repeated rows add up); -1 entries go out of range and drop.
    target = jnp.where(valid, idx, n)
    dkv = dkv.at[jnp.arange(b)[:, None, None], target].add(c, mode="drop")
    return dkv, dq.astype(dt)
