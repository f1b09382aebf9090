"""Routed-expert math shared by every MoE path (single device, expert parallel).

`expert_sum` is the dense specification: a scan over experts in index order, each expert on
every token with its routing weight (0 for tokens not routed to it). It reproduces the
reference's float32 accumulation order exactly and costs E / k times the routed FLOPs; the
fast paths must equal it (float32: 1e-6; bitwise where the backend's matmul is row-invariant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.model.layers import F32, dequant, mm_act
from v4jax.numerics import Precision, fp8_quant_dequant


def swiglu(g: jnp.ndarray, u: jnp.ndarray, limit: float) -> jnp.ndarray:
    """silu(min(g, L)) * clamp(u, -L, L) in float32 (spec 11.18)."""
    if limit > 0:
        u = jnp.clip(u, -limit, limit)
        g = jnp.minimum(g, limit)
    return jax.nn.silu(g) * u


def expert_sum(x, combine, ws, fmt: str, prec: Precision, limit: float) -> jnp.ndarray:
    """x [T, D], combine [E', T], expert weights ws [E', ...] -> sum over the E' experts, in
    index order, of combine-weighted expert outputs [T, D] float32."""
    xq = x.astype(F32)
    xq = fp8_quant_dequant(xq, 128) if prec.simulate_quant else xq

    def linear(a, w, s) -> jnp.ndarray:
        return prec.round(mm_act(a, dequant(fmt, w, s), prec))

    def expert(acc, inputs):
        w1, s1, w2, s2, w3, s3, cw = inputs
        g = linear(xq, w1, s1)
        u = linear(xq, w3, s3)
        h = cw[:, None] * swiglu(g, u, limit)
        h = prec.round(h)
        h = fp8_quant_dequant(h, 128) if prec.simulate_quant else h
        return acc + linear(h, w2, s2), None

    acc0 = jnp.zeros(x.shape, F32)
    out, _ = jax.lax.scan(expert, acc0, (*ws, combine))
    return out


def combine_weights(w: jnp.ndarray, top: jnp.ndarray, n: int) -> jnp.ndarray:
    """Routing weights w [T, k] of experts top [T, k] -> [n, T] weight of expert e (0..n-1)
    for each token (0 where not routed; ids outside [0, n) match nothing)."""
    onehot = top[..., None] == jnp.arange(n)  # [T, k, n]
    return jnp.sum(jnp.where(onehot, w[..., None], 0.0), axis=1).T
