"""A V4 block: mHC site -> attention -> mHC site -> MoE (spec 4, 5)."""

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
