"""MoE (spec 5): sqrt-softplus router with a selection-only bias (or hash routing from
`tid2eid`), renormalised top-k weights times `route_scale`, clamped SwiGLU experts in the
release formats (routed: FP4 or FP8; shared: FP8), routed weight applied before `w2`.

Routed experts run as a scan over experts in index order, each on every token with its routing
weight (0 for tokens not routed to it). That reproduces the reference's float32 accumulation
order exactly; it costs E / k times the routed FLOPs, which is fine at test sizes. Grouped
dispatch (expert parallelism, ragged matmuls) is the sharding issue's business.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.model.layers import F32, Linear, dequant, mm, param
from v4jax.numerics import Precision, fp8_quant_dequant


def swiglu(g: jnp.ndarray, u: jnp.ndarray, limit: float) -> jnp.ndarray:
    """silu(min(g, L)) * clamp(u, -L, L) in float32 (spec 11.18)."""
    if limit > 0:
        u = jnp.clip(u, -limit, limit)
        g = jnp.minimum(g, limit)
    return jax.nn.silu(g) * u


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, hash_routed: bool, prec: Precision):
        self.weight = param((cfg.num_experts, cfg.dim), jnp.bfloat16, ("experts", "embed"))
        if hash_routed:
            self.tid2eid = param(
                (cfg.vocab_size, cfg.experts_per_token), jnp.int32, ("vocab", None)
            )
        else:
            self.bias = param((cfg.num_experts,), F32, ("experts",))
        self.hash_routed, self.k = hash_routed, cfg.experts_per_token
        self.route_scale = cfg.route_scale

    def __call__(self, x: jnp.ndarray, ids: jnp.ndarray):
        """x [T, D], ids [T] -> weights [T, k] float32, expert ids [T, k] int32."""
        logits = mm(x, self.weight[...])
        scores = jnp.sqrt(jnp.where(logits > 20, logits, jnp.log1p(jnp.exp(logits))))
        if self.hash_routed:
            top = self.tid2eid[...][ids]
        else:
            _, top = jax.lax.top_k(scores + self.bias[...], self.k)
        w = jnp.take_along_axis(scores, top, axis=-1)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        return w * F32(self.route_scale), top.astype(jnp.int32)


class RoutedExperts(nnx.Module):
    """All routed experts' weights, stacked on a leading expert axis."""

    def __init__(self, cfg: ModelConfig, prec: Precision):
        e, d, f = cfg.num_experts, cfg.dim, cfg.moe_inter_dim
        self.fmt, self.prec, self.limit = cfg.expert_dtype, prec, cfg.swiglu_limit
        for name, (o, i) in {"w1": (f, d), "w2": (d, f), "w3": (f, d)}.items():
            ax = ("experts", "mlp", "embed") if name != "w2" else ("experts", "embed", "mlp")
            if self.fmt == "fp4":
                w = param((e, o, i // 2), jnp.int8, ax)
                s = param((e, o, i // 32), jnp.float8_e8m0fnu, ax)
            else:
                w = param((e, o, i), jnp.float8_e4m3fn, ax)
                s = param((e, -(-o // 128), -(-i // 128)), jnp.float8_e8m0fnu, ax)
            setattr(self, name, w)
            setattr(self, name + "_scale", s)

    def __call__(self, x: jnp.ndarray, combine: jnp.ndarray) -> jnp.ndarray:
        """x [T, D] (act dtype), combine [E, T] routing weights -> sum_e out_e [T, D] float32."""
        xq = x.astype(F32)
        xq = fp8_quant_dequant(xq, 128) if self.prec.simulate_quant else xq
        ws = (
            self.w1[...],
            self.w1_scale[...],
            self.w2[...],
            self.w2_scale[...],
            self.w3[...],
            self.w3_scale[...],
        )

        def expert(acc, inputs):
            w1, s1, w2, s2, w3, s3, cw = inputs
            g = self._linear(xq, w1, s1)
            u = self._linear(xq, w3, s3)
            h = cw[:, None] * swiglu(g, u, self.limit)
            return acc + self._linear(self._act_in(h), w2, s2), None

        acc0 = jnp.zeros(x.shape, F32)
        out, _ = jax.lax.scan(expert, acc0, (*ws, combine))
        return out

    def _act_in(self, h: jnp.ndarray) -> jnp.ndarray:
        h = self.prec.round(h)
        return fp8_quant_dequant(h, 128) if self.prec.simulate_quant else h

    def _linear(self, xq, w, s) -> jnp.ndarray:
        return self.prec.round(mm(xq, dequant(self.fmt, w, s)))


class SharedExpert(nnx.Module):
    def __init__(self, cfg: ModelConfig, prec: Precision):
        d, f = cfg.dim, cfg.moe_inter_dim
        self.w1 = Linear(d, f, fmt="fp8", axes=("mlp", "embed"), prec=prec)
        self.w2 = Linear(f, d, fmt="fp8", axes=("embed", "mlp"), prec=prec)
        self.w3 = Linear(d, f, fmt="fp8", axes=("mlp", "embed"), prec=prec)
        self.limit = cfg.swiglu_limit

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = swiglu(self.w1(x).astype(F32), self.w3(x).astype(F32), self.limit)
        return self.w2(h.astype(x.dtype))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, hash_routed: bool, prec: Precision):
        self.gate = Router(cfg, hash_routed, prec)
        self.experts = RoutedExperts(cfg, prec)
        self.shared_experts = SharedExpert(cfg, prec)
        self.num_experts, self.prec = cfg.num_experts, prec

    def __call__(self, x: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
        """x [B, S, D] (normed), ids [B, S] token ids -> [B, S, D]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, top = self.gate(x, ids.reshape(-1))
        onehot = top[..., None] == jnp.arange(self.num_experts)  # [T, k, E]
        combine = jnp.sum(jnp.where(onehot, w[..., None], 0.0), axis=1).T  # [E, T]
        y = self.experts(x, combine) + self.shared_experts(x).astype(F32)
        return y.astype(self.prec.dtype).reshape(shape)
