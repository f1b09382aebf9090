"""MoE (spec 5): sqrt-softplus router with a selection-only bias (or hash routing from
`tid2eid`), renormalised top-k weights times `route_scale`, clamped SwiGLU experts in the
release formats (routed: FP4 or FP8; shared: FP8), routed weight applied before `w2`.

Routed experts run as a scan over experts in index order, each on every token with its routing
weight (0 for tokens not routed to it). That reproduces the reference's float32 accumulation
order exactly; it costs E / k times the routed FLOPs, which is fine at test sizes.

Expert parallelism (when the active sharding rules split "experts" over mesh axes; see
`sharding/rules.py`): inside a `shard_map`, each expert rank holds E / n whole experts. Tokens
split over the expert axis are all-gathered (gather-based dispatch), each rank runs the same
scan over its own experts only, and the partial sums are reduce-scattered back (combine); tokens
already replicated over the expert axis are combined with a psum. The router (hash-routed or
scored) runs before the dispatch on the tokens' own shards. Without rules the single-device path
above runs unchanged. Each rank still computes its E / n experts densely on all its tokens
(E / k times the routed FLOPs, as above); grouped (ragged) expert matmuls, capacity-bounded
all-to-all dispatch and expert-local weight reads for small decode batches are performance
follow-ups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sharding import constraints
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


def expert_sum(x, combine, ws, fmt: str, prec: Precision, limit: float) -> jnp.ndarray:
    """x [T, D], combine [E', T], expert weights ws [E', ...] -> sum over the E' experts, in
    index order, of combine-weighted expert outputs [T, D] float32."""
    xq = x.astype(F32)
    xq = fp8_quant_dequant(xq, 128) if prec.simulate_quant else xq

    def linear(a, w, s) -> jnp.ndarray:
        return prec.round(mm(a, dequant(fmt, w, s)))

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


def _expert_parallel_body(x, w, top, *ws, ex, gather, reduce, fmt, prec, limit):
    """One rank: its tokens x [T', D], w / top [T', k], its experts ws [E / n, ...]."""
    if gather:  # tokens split over (part of) the expert axes: dispatch = all-gather
        x, w, top = (jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (x, w, top))
    n_local = ws[0].shape[0]
    first = jax.lax.axis_index(ex) * n_local
    out = expert_sum(x, combine_weights(w, top - first, n_local), ws, fmt, prec, limit)
    if gather:  # combine: sum over expert ranks, each rank keeping its own tokens
        out = jax.lax.psum_scatter(out, gather, scatter_dimension=0, tiled=True)
    if reduce:
        out = jax.lax.psum(out, reduce)
    return out  # [T', D] float32


def expert_parallel(experts: RoutedExperts, x, w, top, ex: tuple[str, ...]) -> jnp.ndarray:
    """Routed experts split over mesh axes `ex` (from the active sharding rules): x [T, D],
    w / top [T, k] -> [T, D] float32. Tokens keep the "batch" sharding of the rules."""
    tok = constraints.mesh_axes("batch", x.shape[0])
    gather = tuple(a for a in tok if a in ex)
    reduce = tuple(a for a in ex if a not in gather)
    body = functools.partial(
        _expert_parallel_body,
        ex=ex,
        gather=gather,
        reduce=reduce,
        fmt=experts.fmt,
        prec=experts.prec,
        limit=experts.limit,
    )
    ws = experts.weights()
    t_spec = P(tok or None, None)
    w_specs = tuple(P(ex, *(None,) * (a.ndim - 1)) for a in ws)
    run = constraints.shard_map(body, in_specs=(t_spec, t_spec, t_spec, *w_specs), out_specs=t_spec)
    return run(x, w, top, *ws)


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
