"""Token-axis KV compressor (reference `Compressor`): gated pooling of r tokens into one entry.

r = 128: entry i pools block i (tokens 128i .. 128i+127), softmax per channel over the block.
r = 4 ("overlap"): the projections have 2c channels; channels [c:2c] of block i and channels
[0:c] of block i-1 are pooled together over 8 slots (block -1 is absent: kv 0, logit -inf).
The pooled vector is rounded to the activation dtype, RMS-normed, RoPE'd at position i*r, then
(main compressor) FP8-simulated on its nope dims or (indexer compressor) Hadamard-rotated and
FP4-simulated. Projections, softmax and pooling are float32 as in the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.model.layers import F32, Linear, RMSNorm, freq_tuple, param, rope
from v4jax.numerics import Precision, fp4_quant_dequant, fp8_quant_dequant, hadamard


class Compressor(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, ratio: int, head_dim: int, *, rotate: bool, prec: Precision
    ):
        self.ratio, self.head_dim, self.rotate, self.prec = ratio, head_dim, rotate, prec
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * head_dim
        ax = ("kv", "embed")
        self.wkv = Linear(cfg.dim, width, fmt="bf16", axes=ax, prec=prec)
        self.wgate = Linear(cfg.dim, width, fmt="bf16", axes=ax, prec=prec)
        self.ape = param((ratio, width), F32, ("ratio", "kv"))
        self.norm = RMSNorm(head_dim, cfg.norm_eps, prec, axis="kv")
        self.rope_dim = cfg.rope_head_dim
        self.freqs = freq_tuple(cfg, ratio)  # static: the layer's RoPE table (base, YaRN)

    def project(self, u: jnp.ndarray):
        """u [B, S, D] -> kv, gate logits (without ape) [B, S, W] float32."""
        return self.wkv(u, out_dtype=F32), self.wgate(u, out_dtype=F32)

    def pool_blocks(self, kv: jnp.ndarray, score: jnp.ndarray, *, leading: bool = False):
        """Complete blocks kv, score+ape [B, C, r, W] -> pooled [B, C, head_dim] float32.

        Overlap: block i also pools block i-1's first half. `leading`: kv / score hold one more
        block in front, the one before entry 0 (context parallelism: from the previous shard);
        otherwise that block is absent (kv 0, logit -inf) and C blocks give C entries."""
        if self.overlap:
            c = self.head_dim
            if not leading:
                shift = ((0, 0), (1, 0), (0, 0), (0, 0))
                kv = jnp.pad(kv, shift)
                score = jnp.pad(score, shift, constant_values=-jnp.inf)
            # [B, C, 2r, c]: block i-1's channels [0:c], then block i's [c:2c]
            kv = jnp.concatenate([kv[:, :-1, :, :c], kv[:, 1:, :, c:]], axis=2)
            score = jnp.concatenate([score[:, :-1, :, :c], score[:, 1:, :, c:]], axis=2)
        elif leading:
            raise ValueError("pool_blocks: leading=True needs an overlapping (ratio 4) compressor")
        return jnp.sum(kv * jax.nn.softmax(score, axis=2), axis=2)

    def __call__(self, u: jnp.ndarray) -> jnp.ndarray:
        """All complete entries of a sequence starting at position 0: [B, S // r, head_dim]."""
        b, s, _ = u.shape
        c = s // self.ratio
        kv, score = self.project(u)
        w = kv.shape[-1]
        kv = kv[:, : c * self.ratio].reshape(b, c, self.ratio, w)
        score = score[:, : c * self.ratio].reshape(b, c, self.ratio, w) + self.ape[...]
        pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32) * self.ratio, (b, c))
        return self.finish(self.pool_blocks(kv, score), pos)

    def finish(self, pooled: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
        """pooled [B, C, c] float32, entry positions i*r [B, C] -> cache entries (act dtype)."""
        x = self.norm(pooled.astype(self.prec.dtype))
        x = rope(x, pos, np.asarray(self.freqs, np.float32))
        if self.rotate:  # indexer keys: Hadamard always, FP4 only in the reference numerics
            x = hadamard(x)
            x = fp4_quant_dequant(x, 32) if self.prec.simulate_quant else x
            return x.astype(self.prec.dtype)
        return quant_kv_nope(x, self.rope_dim, self.prec)


def quant_kv_nope(x: jnp.ndarray, rope_dim: int, prec: Precision) -> jnp.ndarray:
    """FP8 quant-dequant of the nope dims in 64-wide blocks (kernel.py `act_quant`); rope dims
    untouched."""
    if not prec.simulate_quant:
        return x
    nope = fp8_quant_dequant(x[..., :-rope_dim].astype(F32), 64).astype(x.dtype)
    return jnp.concatenate([nope, x[..., -rope_dim:]], axis=-1)
