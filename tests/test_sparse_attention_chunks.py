"""The reference sparse attention in query chunks (`ROW_BUDGET`) equals it in one piece.

Query rows are independent, so the chunked forward and backward compute the same numbers row
for row; only dkv's float32 sums over queries change order (chunk by chunk instead of one
scatter-add), which moves them by a few ulps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.kernels.sparse_attention import reference, sparse_attention


def _inputs(dtype, b=2, s=37, h=4, d=16, k=24, n=30):
    rng = np.random.default_rng(7)
    q = jnp.asarray(2.0 * rng.standard_normal((b, s, h, d)), dtype)
    kv = jnp.asarray(rng.standard_normal((b, n, d)), dtype)
    idx = rng.integers(0, 6, (b, s, k))  # few rows: repeats inside and across chunks
    idx = np.where(rng.random(idx.shape) > 0.3, idx, -1)
    idx[:, 3] = -1  # a query with no entry
    sink = jnp.asarray(rng.standard_normal(h), jnp.float32)
    g = jnp.asarray(rng.standard_normal(q.shape), dtype)
    return q, kv, jnp.asarray(idx, jnp.int32), sink, g


def _run(q, kv, idx, sink, g):
    def loss(q, kv, sink):
        o = sparse_attention(q, kv, idx, sink, scale=0.25, implementation="reference")
        return jnp.sum(o.astype(jnp.float32) * g.astype(jnp.float32)), o

    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, kv, sink)
    return o, grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_equals_whole(monkeypatch, dtype):
    args = _inputs(dtype)
    b, s, _, d = args[0].shape
    k = args[2].shape[-1]
    assert reference.chunk_size(b, s, k, d) == s  # the default budget: one piece
    whole = _run(*args)
    monkeypatch.setattr(reference, "ROW_BUDGET", b * k * d * 8)  # 8 queries: 5 chunks, padded
    assert reference.chunk_size(b, s, k, d) == 8
    chunked = _run(*args)
    (o1, (dq1, dkv1, ds1)), (o2, (dq2, dkv2, ds2)) = whole, chunked
    # Row-wise values (output, dq) and dsink (a sum of row-wise terms in the same order):
    # the same operations on the same rows, so equal.
    np.testing.assert_array_equal(np.asarray(o1, np.float32), np.asarray(o2, np.float32))
    np.testing.assert_array_equal(np.asarray(dq1, np.float32), np.asarray(dq2, np.float32))
    np.testing.assert_allclose(np.asarray(ds1), np.asarray(ds2), rtol=1e-6, atol=1e-6)
    # dkv: float32 sums over queries in another order (then rounded to the input dtype):
    # within a few float32 ulps of the sums' magnitude, or one rounding of bf16.
    a, b_ = np.asarray(dkv1, np.float32), np.asarray(dkv2, np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2**-7
    assert np.max(np.abs(a - b_)) <= tol * np.max(np.abs(a))
