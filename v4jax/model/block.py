"""A V4 block: mHC site -> attention -> mHC site -> MoE (reference `Block`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sharding.constraints import constrain
from v4jax.config import LayerKind, ModelConfig
from v4jax.model.attention import Attention
from v4jax.model.layers import RMSNorm
from v4jax.model.mhc import HyperConnection
from v4jax.model.moe import MoE
from v4jax.numerics import Precision

# Logical activation axes of the residual streams [B, S, N, D] (sharding/rules.py): constrained
# at the stack's entry and after every block, so the layout is the same in every scan step.
STREAMS = ("batch", "length", None, "embed")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: LayerKind, prec: Precision, kernels: str = "auto"):
        self.attn = Attention(cfg, kind.attn, prec, kernels)
        self.ffn = MoE(cfg, kind.hash_routed, prec)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, prec)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, prec)
        self.hc_attn = HyperConnection(cfg, prec)
        self.hc_ffn = HyperConnection(cfg, prec)

    def __call__(self, x: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
        """Streams x [B, S, N, D] of tokens ids [B, S] at positions 0..S-1 -> [B, S, N, D]."""
        y, post, comb = self.hc_attn.pre(x)
        x = self.hc_attn.post(self.attn(self.attn_norm(y)), x, post, comb)
        y, post, comb = self.hc_ffn.pre(x)
        x = self.hc_ffn.post(self.ffn(self.ffn_norm(y), ids), x, post, comb)
        return constrain(x, STREAMS)

    def forward_train(self, x: jnp.ndarray, ids: jnp.ndarray, indexer: str = "off", tail: int = 0):
        """`__call__` plus the block's training statistics (`v4jax.train.losses`): streams
        [B, S, N, D] and {"counts": tokens per routed expert [E], "balance": the router's
        sequence-wise balance term [], "kl" / "kl_queries": indexer KL summed over queries and
        their number [] (0 outside CSA layers or with indexer="off"), "moe_dropped": routed
        assignments a bounded expert-parallel buffer dropped [] (`moe_parallel.buffer`)}; the
        router statistics leave out the last `tail` positions."""
        y, post, comb = self.hc_attn.pre(x)
        a, (kl, nq) = self.attn.forward_train(self.attn_norm(y), indexer)
        x = self.hc_attn.post(a, x, post, comb)
        y, post, comb = self.hc_ffn.pre(x)
        h = self.ffn_norm(y)
        f, dropped = self.ffn.forward_train(h, ids)
        x = self.hc_ffn.post(f, x, post, comb)
        counts, balance = self.ffn.gate.stats(h, ids, tail)
        aux = dict(counts=counts, balance=balance, kl=kl, kl_queries=nq, moe_dropped=dropped)
        return constrain(x, STREAMS), aux
