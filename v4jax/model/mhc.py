"""mHC: manifold-constrained hyper-connections over N residual streams (V4 report §2.2).

Streams X [B, S, N, D] are stored in the activation dtype between sub-blocks. Each site computes
its mixing coefficients in float32 from the flattened streams: pre weights (sigmoid + eps),
post weights (2 sigmoid) and a Sinkhorn-projected N x N mixing matrix indexed [in, out].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.model.layers import F32, mm, param
from v4jax.numerics import Precision


def _mixes(x: jnp.ndarray, fn: jnp.ndarray, norm_eps: float) -> jnp.ndarray:
    """Unweighted RMS of the flattened streams times fn . x  -> [B, S, M] float32."""
    flat = x.reshape(*x.shape[:-2], -1).astype(F32)  # [B, S, N*D]
    rs = jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + F32(norm_eps))
    return mm(flat, fn) * rs


def sinkhorn_split(mixes, scale, base, n: int, iters: int, eps: float):
    """mixes [..., (2+n)n] -> pre [..., n], post [..., n], comb [..., n_in, n_out] (kernel.py
    `hc_split_sinkhorn_kernel`)."""
    pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + F32(eps)
    post = 2 * jax.nn.sigmoid(mixes[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    logits = (mixes[..., 2 * n :] * scale[2] + base[2 * n :]).reshape(*mixes.shape[:-1], n, n)
    comb = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    comb = comb / jnp.sum(comb, axis=-1, keepdims=True) + F32(eps)
    comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + F32(eps))

    def round_(c, _):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + F32(eps))
        return c / (jnp.sum(c, axis=-2, keepdims=True) + F32(eps)), None

    comb, _ = jax.lax.scan(round_, comb, None, length=iters - 1)
    return pre, post, comb


class HyperConnection(nnx.Module):
    """One mHC site (before attention or before the MoE) of a block."""

    def __init__(self, cfg: ModelConfig, prec: Precision):
        n, d = cfg.hc_mult, cfg.dim
        self.fn = param((cfg.mix_hc, n * d), F32, ("hc_mix", "embed"))
        self.base = param((cfg.mix_hc,), F32, ("hc_mix",))
        self.scale = param((3,), F32, (None,))
        self.cfg, self.prec = cfg, prec

    def pre(self, x: jnp.ndarray):
        """x [B, S, N, D] -> sub-block input [B, S, D], post [B, S, N], comb [B, S, N, N]."""
        c = self.cfg
        m = _mixes(x, self.fn[...], c.norm_eps)
        pre, post, comb = sinkhorn_split(
            m, self.scale[...], self.base[...], c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps
        )
        y = jnp.sum(pre[..., None] * x.astype(F32), axis=-2)
        return y.astype(self.prec.dtype), post, comb

    def post(self, f: jnp.ndarray, x: jnp.ndarray, post: jnp.ndarray, comb: jnp.ndarray):
        """New streams X'_k = post_k f + sum_j comb[j, k] X_j  -> [B, S, N, D]."""
        mixed = jnp.einsum("bsjk,bsjd->bskd", comb, x.astype(F32), precision="highest")
        y = post[..., None] * f.astype(F32)[..., None, :] + mixed
        return y.astype(self.prec.dtype)


class HyperHead(nnx.Module):
    """Final stream collapse (reference `ParallelHead.hc_head`): sigmoid weights, no Sinkhorn."""

    def __init__(self, cfg: ModelConfig, prec: Precision):
        n, d = cfg.hc_mult, cfg.dim
        self.fn = param((n, n * d), F32, ("hc", "embed"))
        self.base = param((n,), F32, ("hc",))
        self.scale = param((1,), F32, (None,))
        self.cfg, self.prec = cfg, prec

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, S, N, D] -> [B, S, D]
        m = _mixes(x, self.fn[...], self.cfg.norm_eps)
        pre = jax.nn.sigmoid(m * self.scale[...] + self.base[...]) + F32(self.cfg.hc_eps)
        return jnp.sum(pre[..., None] * x.astype(F32), axis=-2).astype(self.prec.dtype)
