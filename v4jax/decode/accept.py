"""Draft proposal and the acceptance rules of speculative decoding (Leviathan et al. 2023).

Greedy: a draft is accepted iff it equals the main model's argmax; the emitted tokens are then
exactly the argmaxes at the verified positions, so the output equals plain greedy decoding.

Sampling (Leviathan et al. 2023, Chen et al. 2023): drafts x_j are sampled from the draft
distribution q_j and kept; x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)) in
order; at the first rejection the emitted token is drawn from norm(max(0, p_j - q_j)), and
when all k drafts pass, a bonus token is drawn from p_{k+1}. Each emitted token is then
distributed as p: P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) r(x) = p(x).
p and q are the distributions plain sampling draws from (temperature, then top-k, then top-p:
`sampling.sample`), so speculative output is distributed as plain sampling's. A deterministic
drafter (a test oracle) is the case q = one-hot(x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.decode.sampling import Sampling, greedy, top_k_mask, top_p_mask

__all__ = [
    "accept_prob",
    "filtered_logits",
    "greedy_accept",
    "probs",
    "propose",
    "residual",
    "sample_accept",
]


def filtered_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """[..., V] -> the logits `sampling.sample` draws from (temperature > 0): tempered, top-k
    and top-p filtered (-inf outside)."""
    shape = logits.shape
    x = logits.reshape(-1, shape[-1]) / s.temperature
    if s.top_k:
        x = top_k_mask(x, min(s.top_k, x.shape[-1]))
    if s.top_p < 1.0:
        x = top_p_mask(x, s.top_p)
    return x.reshape(shape)


def probs(logits: jax.Array, s: Sampling) -> jax.Array:
    """[..., V] -> the sampling distribution [..., V] float32."""
    return jax.nn.softmax(filtered_logits(logits.astype(jnp.float32), s), axis=-1)


def propose(logits: jax.Array, key: jax.Array, s: Sampling):
    """Draft logits [B, V] -> (draft [B] int32, its distribution q [B, V], None if greedy)."""
    if s.temperature == 0.0:
        return greedy(logits), None
    q = probs(logits, s)
    return jax.random.categorical(key, jnp.log(q), axis=-1).astype(jnp.int32), q


def accept_prob(p: jax.Array, q: jax.Array, x: jax.Array) -> jax.Array:
    """min(1, p(x) / q(x)) for drafts x [...] of distributions p, q [..., V] (q(x) > 0)."""
    px = jnp.take_along_axis(p, x[..., None], axis=-1)[..., 0]
    qx = jnp.take_along_axis(q, x[..., None], axis=-1)[..., 0]
    return jnp.minimum(1.0, px / qx)


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
    """norm(max(0, p - q)) [..., V]; p itself where that is all zero (p = q: never needed)."""
    r = jnp.maximum(p - q, 0.0)
    z = jnp.sum(r, axis=-1, keepdims=True)
    return jnp.where(z > 0, r / jnp.where(z > 0, z, 1.0), p)


def _leading(ok: jax.Array) -> jax.Array:
    """ok [B, k] bool -> the number of leading True per row [B] int32."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)


def greedy_accept(drafts: jax.Array, logits: jax.Array):
    """drafts [B, k], verify logits [B, k+1, V] -> (accepted a [B], emitted [B, k+1]: the
    tokens a sequence emits are emitted[:, :a+1])."""
    target = greedy(logits)  # [B, k+1]
    a = _leading(drafts == target[:, :-1])
    return a, target  # accepted drafts equal the target; target[a] is the correction


def sample_accept(drafts: jax.Array, q: jax.Array, p: jax.Array, key: jax.Array):
    """drafts [B, k] sampled from q [B, k, V]; target distributions p [B, k+1, V] ->
    (accepted a [B], emitted [B, k+1]) as in `greedy_accept`."""
    b, k = drafts.shape
    ku, kr = jax.random.split(key)
    px = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    qx = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(ku, (b, k))
    a = _leading(u * qx < px)  # u < p(x)/q(x): probability min(1, p(x)/q(x)) as q(x) > 0
    rows = jnp.arange(b)
    q0 = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q = 0 after k: the bonus
    r = residual(p[rows, a], q0[rows, a])  # [B, V]
    c = jax.random.categorical(kr, jnp.log(r), axis=-1).astype(jnp.int32)
    emitted = jnp.concatenate([drafts, c[:, None]], axis=1)
    return a, emitted.at[rows, a].set(c)
