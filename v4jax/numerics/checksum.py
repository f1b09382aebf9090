"""Position-weighted byte checksums of arrays, computed on their device (no host copy of the
weights): identifies the weights a LoRA adapter was trained on and the model a prefix-cache
entry was computed with."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["checksum", "checksums"]


@jax.jit
def checksum(a: jax.Array) -> jax.Array:
    """sum_k byte_k * (2654435761 k + 1) mod 2^32 (uint32 arithmetic wraps: exact, any order)."""
    b = jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(-1).astype(jnp.uint32)
    k = jnp.arange(b.shape[0], dtype=jnp.uint32)
    return jnp.sum(b * (k * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def checksums(leaves: list) -> jax.Array:
    """`checksum` of every array of a list, in one compiled call -> [len] uint32."""
    return jnp.stack([checksum(a) for a in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)
