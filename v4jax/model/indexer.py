"""Lightning indexer of CSA layers (reference `Indexer`): the top-k compressed entries per query.

Queries come from the attention's query latent (`c_q`), keys from the indexer's own ratio-4
compressor (Hadamard-rotated, FP4-simulated in the reference numerics). Score
I[t, i] = sum_h w_h ReLU(q_h . k_i), computed with the reference's bf16 rounding points.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.kernels.sparse_attention.reference import from_chunks, to_chunks
from v4jax.model.compressor import Compressor
from v4jax.model.layers import F32, Linear, act_einsum, freq_tuple, rope
from v4jax.numerics import Precision, fp4_quant_dequant, hadamard

# Elements of one query chunk's [B, c, H, C] index logits in `Indexer.pick` (1 GiB of float32):
# at 4K tokens (C = 1K entries, H = 64) a whole sequence is one chunk; at 64K on 8 context
# shards a chunk is 256 queries, at 1M on 64 shards 16.
SCORE_BUDGET = 1 << 28


def entry_visible(t: jnp.ndarray, n: int, ratio: int) -> jnp.ndarray:
    """Entry i is visible to query t iff its block is complete: (i + 1) r <= t + 1 (reference
    `get_compress_topk_idxs`)."""
    return jnp.arange(n)[None, :] < ((t + 1) // ratio)[:, None]


class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, prec: Precision):
        self.heads, self.head_dim, self.topk = cfg.index_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(
            cfg.q_lora_rank,
            self.heads * self.head_dim,
            fmt="fp8",
            axes=("index", "q_lora"),
            prec=prec,
        )
        self.weights_proj = Linear(
            cfg.dim, self.heads, fmt="bf16", axes=("index", "embed"), prec=prec
        )
        self.compressor = Compressor(cfg, 4, self.head_dim, rotate=True, prec=prec)
        self.freqs = freq_tuple(cfg, 4)
        self.prec = prec

    def queries(self, qr: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
        """c_q [B, S, Q] -> rotated (and FP4-simulated) indexer queries [B, S, H, K]."""
        b, s, _ = qr.shape
        q = self.wq_b(qr).reshape(b, s, self.heads, self.head_dim)
        q = rope(q, pos, np.asarray(self.freqs, np.float32))
        q = hadamard(q)
        q = fp4_quant_dequant(q, 32) if self.prec.simulate_quant else q
        return q.astype(self.prec.dtype)

    def scores(self, u: jnp.ndarray, q: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
        """Index scores [B, S, C] (activation dtype arithmetic, as the reference's bf16)."""
        return self.weighted_scores(self.head_weights(u), q, keys)

    def head_weights(self, u: jnp.ndarray) -> jnp.ndarray:
        """Per-query head weights w_h [B, S, H] (scaled, rounded as the reference)."""
        w = self.weights_proj(u).astype(F32) * F32(self.head_dim**-0.5 * self.heads**-0.5)
        return self.prec.round(w)

    def weighted_scores(self, w: jnp.ndarray, q: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
        """sum_h w_h ReLU(q_h . k_i): head weights [B, S, H], queries [B, S, H, K], keys
        [B, C, K] -> [B, S, C]."""
        rnd = self.prec.round
        logits = rnd(act_einsum("bshk,bck->bshc", q, keys, self.prec))
        weighted = rnd(jnp.maximum(logits, 0.0) * w[..., None])
        return rnd(jnp.sum(weighted, axis=2))

    def __call__(self, u, qr, pos, keys, visible) -> jnp.ndarray:
        """Top-k entry indices [B, S, k] (-1 where the pick is not visible to the query).

        `keys` [B, C, K] are the indexer's compressed keys, `visible` [B, S, C] the causal
        mask of entries (block complete at or before the query).
        """
        if min(self.topk, keys.shape[1]) == 0:
            return jnp.zeros(u.shape[:2] + (0,), jnp.int32)
        return self.select(self.scores(u, self.queries(qr, pos), keys), visible)

    def pick(self, w, q, keys, t, ratio: int) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The top-k visible entries of each query and their index scores, a chunk of queries
        at a time: head weights w [B, S, H], queries q [B, S, H, K], keys [B, C, K], query
        positions t [S] (entries visible as `entry_visible(t, C, ratio)`) -> (entry indices
        [B, S, k] int32, -1 none; their scores [B, S, k], 0 at -1). Rows are independent, so
        this equals `select(weighted_scores(...))` row for row; only c queries' [B, c, H, C]
        logits exist at once (c B H C <= SCORE_BUDGET), and the backward pass recomputes
        each chunk's instead of keeping them."""
        (b, s, h), n = w.shape, keys.shape[1]
        if min(self.topk, n) == 0:
            return jnp.zeros((b, s, 0), jnp.int32), jnp.zeros((b, s, 0), w.dtype)
        c = max(1, min(s, SCORE_BUDGET // (b * h * n)))
        rows = functools.partial(self._pick_rows, keys=keys, ratio=ratio)
        if c == s:
            return rows(w, q, t)
        m = -(-s // c)
        t = jnp.pad(t, (0, m * c - s), constant_values=-1).reshape(m, c)  # sees no entry
        out = jax.lax.map(jax.checkpoint(lambda x: rows(*x)), (to_chunks(w, c), to_chunks(q, c), t))
        return tuple(from_chunks(a, s) for a in out)

    def _pick_rows(self, w, q, t, *, keys, ratio: int):
        scores = self.weighted_scores(w, q, keys)
        vis = jnp.broadcast_to(entry_visible(t, keys.shape[1], ratio), scores.shape)
        idx = self.select(scores, vis)
        at = jnp.take_along_axis(scores, jnp.maximum(idx, 0), axis=-1)
        return idx, jnp.where(idx >= 0, at, 0)

    def select(self, scores: jnp.ndarray, visible: jnp.ndarray) -> jnp.ndarray:
        """Index scores [B, S, C] -> the top-k visible entries [B, S, min(topk, C)] (-1 where
        the pick is not visible)."""
        k = min(self.topk, scores.shape[-1])
        _, top = jax.lax.top_k(jnp.where(visible, scores, -jnp.inf), k)  # ties: lower first
        picked_ok = jnp.take_along_axis(visible, top, axis=-1)
        return jnp.where(picked_ok, top, -1).astype(jnp.int32)


def indexer_kl(target: jnp.ndarray, logits: jnp.ndarray, valid: jnp.ndarray):
    """sum_t KL(p_t || softmax(logits_t)) over a per-query entry set (V3.2 report §2.1.1):
    target [..., K] non-negative attention mass (p_t = target / sum), logits [..., K]
    index scores, valid [..., K] the set. Returns (KL summed over the queries whose set holds
    mass, number of those queries), in the inputs' float dtype."""
    target = jnp.where(valid, target, 0.0)
    total = jnp.sum(target, axis=-1, keepdims=True)
    has = total[..., 0] > 0
    p = target / jnp.where(total > 0, total, 1.0)
    masked = jnp.where(valid, logits, -jnp.inf)
    masked = jnp.where(jnp.any(valid, axis=-1, keepdims=True), masked, 0.0)  # no NaN rows
    logq = jax.nn.log_softmax(masked, axis=-1)
    logq = jnp.where(valid, logq, 0.0)
    logp = jnp.log(jnp.where(p > 0, p, 1.0))
    kl = jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)
    return jnp.sum(jnp.where(has, kl, 0.0)), jnp.sum(has).astype(kl.dtype)
