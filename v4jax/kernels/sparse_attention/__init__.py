"""The sparse-attention op: window + compressed entries + sink, one softmax (spec section 3.1).

`implementation="reference"` is the pure-jnp specification; `"auto"` picks it everywhere until
the Pallas backends land; `"pallas"` raises until then.
"""

from __future__ import annotations

import jax.numpy as jnp

from v4jax.kernels.sparse_attention.reference import sparse_attention_reference

__all__ = ["sparse_attention", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("reference", "pallas", "auto")


def sparse_attention(
    q: jnp.ndarray,  # [B, S, H, D]
    kv: jnp.ndarray,  # [B, N, D]
    idx: jnp.ndarray,  # [B, S, K] int32, -1 = none
    sink: jnp.ndarray,  # [H]
    *,
    scale: float,
    implementation: str = "auto",
) -> jnp.ndarray:
    """Softmax(q . kv[idx] * scale with a per-head sink) @ kv[idx], per query token."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation == "pallas":
        raise NotImplementedError("the Pallas sparse-attention kernels are not implemented yet")
    return sparse_attention_reference(q, kv, idx, sink, scale=scale)
