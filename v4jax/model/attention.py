"""V4 attention (spec 3.1): low-rank queries, one shared K = V head, sliding window plus
compressed entries (CSA: indexer top-k; HCA: all complete entries), one softmax with a sink,
de-rotated output and the grouped low-rank output projection.

`__call__` is the full-sequence form (tokens at positions 0 .. S-1). The pieces (`queries`,
`window_kv`, `output`) are public so the decode loop can drive them with its cache.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import Attn, ModelConfig
from v4jax.kernels.sparse_attention import sparse_attention
from v4jax.model.compressor import Compressor, quant_kv_nope
from v4jax.model.indexer import Indexer
from v4jax.model.layers import (
    F32,
    Linear,
    RMSNorm,
    act_einsum,
    dequant,
    freq_tuple,
    param,
    rope,
)
from v4jax.numerics import Precision


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, attn: Attn, prec: Precision, kernels: str = "auto"):
        d, h, k = cfg.dim, cfg.num_heads, cfg.head_dim
        self.cfg, self.ratio, self.prec, self.kernels = cfg, int(attn), prec, kernels
        self.wq_a = Linear(d, cfg.q_lora_rank, fmt="fp8", axes=("q_lora", "embed"), prec=prec)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, prec, axis="q_lora")
        self.wq_b = Linear(cfg.q_lora_rank, h * k, fmt="fp8", axes=("heads", "q_lora"), prec=prec)
        self.wkv = Linear(d, k, fmt="fp8", axes=("kv", "embed"), prec=prec)
        self.kv_norm = RMSNorm(k, cfg.norm_eps, prec, axis="kv")
        o_in = h * k // cfg.o_groups
        self.wo_a = Linear(
            o_in, cfg.o_groups * cfg.o_lora_rank, fmt="fp8", axes=("o_lora", "o_in"), prec=prec
        )
        self.wo_b = Linear(
            cfg.o_groups * cfg.o_lora_rank, d, fmt="fp8", axes=("embed", "o_lora"), prec=prec
        )
        self.attn_sink = param((h,), F32, ("heads",))
        self.compressor = (
            Compressor(cfg, self.ratio, k, rotate=False, prec=prec) if self.ratio else None
        )
        self.indexer = Indexer(cfg, prec) if attn is Attn.CSA else None
        self.freqs = freq_tuple(cfg, self.ratio)

    # ---- pieces ----
    def queries(self, u: jnp.ndarray, pos: jnp.ndarray):
        """u [B, S, D] -> query latent c_q [B, S, Q] and roped queries [B, S, H, K]."""
        c = self.cfg
        b, s, _ = u.shape
        qr = self.q_norm(self.wq_a(u))
        q = self.wq_b(qr).reshape(b, s, c.num_heads, c.head_dim)
        q = head_rms(q, c.norm_eps, self.prec)
        return qr, rope(q, pos, self._freqs())

    def window_kv(self, u: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
        """The raw K = V rows of the tokens [B, S, K] (normed, roped, nope FP8-simulated)."""
        kv = rope(self.kv_norm(self.wkv(u)), pos, self._freqs())
        return quant_kv_nope(kv, self.cfg.rope_head_dim, self.prec)

    def output(self, q, pool, idx, pos) -> jnp.ndarray:
        """Sparse attention over pool[idx], de-rotation, grouped low-rank projection -> [B,S,D]."""
        c = self.cfg
        o = sparse_attention(
            q, pool, idx, self.attn_sink[...], scale=c.head_dim**-0.5, implementation=self._impl()
        )
        o = rope(o, pos, self._freqs(), inverse=True)
        b, s = o.shape[:2]
        o = o.reshape(b, s, c.o_groups, -1).astype(F32)  # [B, S, G, H*K/G]
        wa = dequant("fp8", self.wo_a.weight[...], self.wo_a.scale)
        wa = wa.astype(jnp.bfloat16).astype(F32).reshape(c.o_groups, c.o_lora_rank, -1)
        z = act_einsum("bsgi,gri->bsgr", o, wa, self.prec).astype(self.prec.dtype)
        return self.wo_b(z.reshape(b, s, -1))

    # ---- full sequence from position 0 ----
    def __call__(self, u: jnp.ndarray) -> jnp.ndarray:
        b, s, _ = u.shape
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        qr, q = self.queries(u, pos)
        pool = self.window_kv(u, pos)
        win = prefill_window_idx(s, self.cfg.window_size)  # [S, W]
        idx = jnp.broadcast_to(win, (b, *win.shape))
        if self.ratio:
            entries = self.compressor(u)  # [B, C, K]
            n = entries.shape[1]
            visible = entry_visible(jnp.arange(s), n, self.ratio)  # [S, C]
            if self.indexer is not None:
                keys = self.indexer.compressor(u)
                vis = jnp.broadcast_to(visible, (b, s, n))
                comp = self.indexer(u, qr, pos, keys, vis)
            else:
                comp = jnp.broadcast_to(jnp.where(visible, jnp.arange(n), -1), (b, s, n))
            idx = jnp.concatenate([idx, jnp.where(comp >= 0, comp + s, -1)], axis=-1)
            pool = jnp.concatenate([pool, entries], axis=1)
        return self.output(q, pool, idx.astype(jnp.int32), pos)

    def _freqs(self) -> np.ndarray:
        return np.asarray(self.freqs, np.float32)

    def _impl(self) -> str:
        return self.kernels  # the op resolves "auto" by backend (kernels on GPU / TPU)


def head_rms(q: jnp.ndarray, eps: float, prec: Precision) -> jnp.ndarray:
    """Weightless per-head RMS rescale with the reference's bf16 rounding of every op (11.5)."""
    rnd = prec.round
    qf = q.astype(F32)
    ms = rnd(jnp.mean(rnd(qf * qf), axis=-1, keepdims=True))
    r = rnd(1.0 / jnp.sqrt(rnd(ms + F32(eps))))
    return (qf * r).astype(prec.dtype)


def prefill_window_idx(s: int, window: int) -> jnp.ndarray:
    """[S, min(S, W)] window rows of each query, oldest first, -1 for rows after the query."""
    t = jnp.arange(s)[:, None]
    rows = jnp.maximum(t - window + 1, 0) + jnp.arange(min(s, window))[None, :]
    return jnp.where(rows > t, -1, rows).astype(jnp.int32)


def entry_visible(t: jnp.ndarray, n: int, ratio: int) -> jnp.ndarray:
    """Entry i is visible to query t iff its block is complete: (i + 1) r <= t + 1 (spec 3.4)."""
    return jnp.arange(n)[None, :] < ((t + 1) // ratio)[:, None]
