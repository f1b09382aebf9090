"""MoE (spec 5): sqrt-softplus router with a selection-only bias (or hash routing from
`tid2eid`), renormalised top-k weights times `route_scale`, clamped SwiGLU experts in the
release formats (routed: FP4 or FP8; shared: FP8), routed weight applied before `w2`.

Routed-expert math: `experts.py` (single device); expert parallelism: `moe_parallel.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sharding import constraints
from v4jax.config import ModelConfig
from v4jax.model.experts import combine_weights, expert_sum, swiglu
from v4jax.model.layers import F32, Linear, mm, param
from v4jax.model.moe_parallel import expert_parallel
from v4jax.numerics import Precision


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, hash_routed: bool):
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

    def weights(self) -> tuple[jnp.ndarray, ...]:
        """(w1, s1, w2, s2, w3, s3), each with a leading expert axis [E, ...]."""
        names = ("w1", "w1_scale", "w2", "w2_scale", "w3", "w3_scale")
        return tuple(getattr(self, n)[...] for n in names)

    def __call__(self, x: jnp.ndarray, combine: jnp.ndarray) -> jnp.ndarray:
        """x [T, D] (act dtype), combine [E, T] routing weights -> sum_e out_e [T, D] float32."""
        return expert_sum(x, combine, self.weights(), self.fmt, self.prec, self.limit)


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
        self.gate = Router(cfg, hash_routed)
        self.experts = RoutedExperts(cfg, prec)
        self.shared_experts = SharedExpert(cfg, prec)
        self.num_experts, self.prec = cfg.num_experts, prec

    def __call__(self, x: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
        """x [B, S, D] (normed), ids [B, S] token ids -> [B, S, D]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, top = self.gate(x, ids.reshape(-1))
        ex = constraints.mesh_axes("experts", self.num_experts)
        if ex:  # expert parallelism under the active sharding rules
            routed = expert_parallel(self.experts, x, w, top, ex)
        else:  # single device (or experts unsplit): the exact scan over all experts
            routed = self.experts(x, combine_weights(w, top, self.num_experts))  # [E, T]
        y = routed + self.shared_experts(x).astype(F32)
        return y.astype(self.prec.dtype).reshape(shape)
