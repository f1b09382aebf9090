"""Sampling as small pure functions of (logits [B, V] float32, key) -> tokens [B] int32.

`Sampling` is a frozen description (greedy, temperature, top-k, top-p) used by `generate`;
every method draws with an explicit PRNG key, so a seed reproduces a run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["Sampling", "greedy", "sample", "top_k_mask", "top_p_mask"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


def greedy(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Logits outside each row's k largest set to -inf (ties at the k-th value kept)."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches p."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep_sorted = before < p
    keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    return jnp.where(keep, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    if s.temperature == 0.0:
        return greedy(logits)
    x = logits / s.temperature
    if s.top_k:
        x = top_k_mask(x, min(s.top_k, x.shape[-1]))
    if s.top_p < 1.0:
        x = top_p_mask(x, s.top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
