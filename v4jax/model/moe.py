"""MoE (reference `MoE`): sqrt-softplus router with a selection-only bias (or hash routing from
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
from v4jax.model import remat
from v4jax.model.experts import routed_experts, swiglu
from v4jax.model.layers import F32, Linear, gathered, mm, param
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
        scores = self.scores(x)
        top = self.select(scores, ids)
        w = jnp.take_along_axis(scores, top, axis=-1)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
        return w * F32(self.route_scale), top

    def scores(self, x: jnp.ndarray) -> jnp.ndarray:
        """Affinities s = sqrt(softplus(x W^T)) [..., E] float32 (PyTorch softplus, threshold
        20; the log1p branch is evaluated at min(logit, 20) so its gradient stays finite)."""
        logits = mm(x, self.weight[...])
        soft = jnp.log1p(jnp.exp(jnp.minimum(logits, 20.0)))
        return jnp.sqrt(jnp.where(logits > 20, logits, soft))

    def select(self, scores: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
        """Expert ids [..., k] int32: tid2eid[ids] (hash layers) or top-k of scores + bias."""
        if self.hash_routed:
            return self.tid2eid[...][ids].astype(jnp.int32)
        _, top = jax.lax.top_k(scores + self.bias[...], self.k)
        return top.astype(jnp.int32)

    def stats(self, x: jnp.ndarray, ids: jnp.ndarray, tail: int = 0):
        """x [B, S, D] (the MoE input), ids [B, S] -> (tokens routed to each expert [E],
        sequence-wise balance term [], 0 for hash layers), float32 (`balance_stats`), over
        the first S - `tail` positions of each sequence (the MTP's last has no token)."""
        scores = self.scores(x)
        counts, balance = self.balance_stats(scores, self.select(scores, ids), tail)
        return counts, jnp.zeros((), F32) if self.hash_routed else balance

    @staticmethod
    def balance_stats(scores: jnp.ndarray, top: jnp.ndarray, tail: int = 0):
        """Affinities [B, S, E], picks [B, S, k] -> (tokens per expert [E], mean over sequences
        of sum_i f_i P_i []) with f_i = E / (k S) * (picks of i in the sequence) and P_i =
        mean over the sequence of s_i / sum_j s_j (V3 report §2.1.2, kept by
        V4 report §2.1), over the first S - `tail` positions (S counts those). f carries no
        gradient, P does (through the affinities)."""
        (_, s, e), k = scores.shape, top.shape[-1]
        hits = jnp.sum(jax.nn.one_hot(top, e, dtype=scores.dtype), axis=-2)  # [B, S, E]
        share = scores / jnp.sum(scores, axis=-1, keepdims=True)
        if tail:  # weights, not a slice: the sequence keeps its length (and its sharding)
            keep = (jnp.arange(s) < s - tail)[None, :, None]
            hits, share, s = jnp.where(keep, hits, 0.0), jnp.where(keep, share, 0.0), s - tail
            p = jnp.sum(share, axis=1) / s
        else:
            p = jnp.mean(share, axis=1)
        f = jnp.sum(hits, axis=1) * (e / (k * s))
        return jnp.sum(hits, axis=(0, 1)), jnp.mean(jnp.sum(f * p, axis=-1))


class RoutedExperts(nnx.Module):
    """All routed experts' weights, stacked on a leading expert axis."""

    def __init__(self, cfg: ModelConfig, prec: Precision):
        e, d, f = cfg.num_experts, cfg.dim, cfg.moe_inter_dim
        self.fmt, self.prec, self.limit = cfg.expert_dtype, prec, cfg.swiglu_limit
        for name, (o, i) in {"w1": (f, d), "w2": (d, f), "w3": (f, d)}.items():
            ax = ("experts", "mlp", "embed") if name != "w2" else ("experts", "embed", "mlp")
            if self.fmt == "fp4":  # used as activation-dtype operands only (`layers.param`)
                w = param((e, o, i // 2), jnp.int8, ax, prec.dtype)
                s = param((e, o, i // 32), jnp.float8_e8m0fnu, ax)
            else:
                w = param((e, o, i), jnp.float8_e4m3fn, ax, prec.dtype)
                s = param((e, -(-o // 128), -(-i // 128)), jnp.float8_e8m0fnu, ax)
            setattr(self, name, w)
            setattr(self, name + "_scale", s)

    def weights(self) -> tuple[jnp.ndarray, ...]:
        """(w1, s1, w2, s2, w3, s3), each with a leading expert axis [E, ...]."""
        names = ("w1", "w1_scale", "w2", "w2_scale", "w3", "w3_scale")
        return tuple(getattr(self, n)[...] for n in names)

    def __call__(self, x: jnp.ndarray, w: jnp.ndarray, top: jnp.ndarray) -> jnp.ndarray:
        """x [T, D] (act dtype), routing weights w [T, k] of experts top [T, k] -> sum of the
        routed experts' outputs [T, D] float32 (dropless grouped paths, `experts.py`)."""
        return routed_experts(x, w, top, self.weights(), self.fmt, self.prec, self.limit)


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
        return self.forward_train(x, ids)[0]

    def forward_train(self, x: jnp.ndarray, ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`__call__` and the routed assignments dropped by a bounded expert-parallel buffer
        (`moe_parallel.buffer`; float32 [], 0 when dropless)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, top = self.gate(x, ids.reshape(-1))
        ex = constraints.mesh_axes("experts", self.num_experts)
        if ex:  # expert parallelism under the active sharding rules
            # tokens [B * S]: rows split over the batch axes, each row's over the length axes
            tok = constraints.mesh_axes("batch", shape[0])
            tok += constraints.mesh_axes("length", shape[1]) if len(shape) == 3 else ()
            # each rank's experts whole, gathered over the ZeRO axes here in bf16 (float32
            # masters cast before, back after: their gradient sums over tiles in float32)
            # rather than in float32 by the shard_map's in_specs
            experts = gathered(self.experts, whole=("mlp", "embed"), upcast=True)
            routed, dropped = expert_parallel(experts, x, w, top, ex, tok=tok, with_dropped=True)
        else:  # single device (or experts unsplit): each expert on its own tokens only
            routed, dropped = self.experts(x, w, top), jnp.zeros((), F32)
        routed = remat.name(routed, "moe_routed")
        y = routed + remat.name(self.shared_experts(x), "moe_shared").astype(F32)
        return y.astype(self.prec.dtype).reshape(shape), dropped
