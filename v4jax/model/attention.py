"""V4 attention (reference `Attention`): low-rank queries, one shared K = V head, sliding window
plus compressed entries (CSA: indexer top-k; HCA: all complete entries), one softmax with a
sink, de-rotated output and the grouped low-rank output projection.

`__call__` is the full-sequence form (tokens at positions 0 .. S-1); `forward_train` is the
same with the lightning indexer's training stages and KL (V3.2 report §2.1.1). The
pieces (`queries`, `window_kv`, `output`) are public so the decode loop can drive them with its
cache. `wo_a` is rounded to bf16 as the reference does (bf16 activations only: a float32
forward keeps the float32 weight, which the release's FP8 values fit exactly) with a
straight-through gradient, so a float32 master's gradient is never rounded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sharding import constraints
from v4jax.config import Attn, ModelConfig
from v4jax.kernels.sparse_attention import sparse_attention
from v4jax.model import context_parallel, remat
from v4jax.model.compressor import Compressor, quant_kv_nope
from v4jax.model.indexer import Indexer, entry_visible, indexer_kl
from v4jax.model.layers import (
    F32,
    HI,
    Linear,
    RMSNorm,
    act_einsum,
    dequant,
    freq_tuple,
    param,
    rope,
)
from v4jax.numerics import Precision

INDEXER_STAGES = ("off", "dense", "sparse")


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
        return self.project(self.attend(q, pool, idx), pos)

    def attend(self, q, pool, idx, sink=None) -> jnp.ndarray:
        """Sparse attention of queries [B, S, H, K] over rows pool[idx] (-1: none) -> [B,S,H,K]
        (`sink`: the heads' sinks, by default the layer's own)."""
        o = sparse_attention(
            q,
            pool,
            idx,
            self.attn_sink[...] if sink is None else sink,
            scale=self.cfg.head_dim**-0.5,
            implementation=self._impl(),
        )
        return remat.name(o, "attn_ctx")

    def project(self, o, pos) -> jnp.ndarray:
        """Attention context [B, S, H, K] -> de-rotated, grouped low-rank projection [B, S, D]."""
        c = self.cfg
        o = rope(o, pos, self._freqs(), inverse=True)
        b, s = o.shape[:2]
        o = o.reshape(b, s, c.o_groups, -1).astype(F32)  # [B, S, G, H*K/G]
        wa = dequant("fp8", self.wo_a.weight[...], self.wo_a.scale)
        if self.prec.dtype != jnp.dtype(F32):  # bf16 wo_a, as the reference's convert.py
            wa = round_straight_through(wa, jnp.bfloat16)
        wa = wa.reshape(c.o_groups, c.o_lora_rank, -1)
        z = act_einsum("bsgi,gri->bsgr", o, wa, self.prec).astype(self.prec.dtype)
        return self.wo_b(z.reshape(b, s, -1))

    # ---- full sequence from position 0 ----
    def __call__(self, u: jnp.ndarray) -> jnp.ndarray:
        return self.forward_train(u, "off")[0]

    def forward_train(self, u: jnp.ndarray, indexer: str = "off"):
        """u [B, S, D] -> (output [B, S, D], (indexer KL summed over queries, queries) float32).

        `indexer` (CSA layers; V3.2 report §2.1.1): "off" = inference, no KL;
        "dense" = warm-up: attention over every visible entry, the indexer scored against it;
        "sparse" = attention over the indexer's top-k, KL over the picked entries. In both
        training stages the indexer reads detached inputs and the KL target is detached, so
        the indexer learns from the KL only and the rest of the model never sees it.
        """
        if indexer not in INDEXER_STAGES:
            raise ValueError(f"indexer={indexer!r}: expected one of {INDEXER_STAGES}")
        b, s, _ = u.shape
        ctx = constraints.mesh_axes("length", s)
        if ctx:  # the sequence is split over mesh axes: two-stage context parallelism
            return context_parallel.attention(self, u, indexer, ctx)
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        qr, q = self.queries(u, pos)
        core = {"q": q, "kv": self.window_kv(u, pos)}
        if self.ratio:
            core["entries"] = entries = self.compressor(u)  # [B, C, K]
            n = entries.shape[1]
            vis = jnp.broadcast_to(entry_visible(jnp.arange(s), n, self.ratio), (b, s, n))
            core["comp"] = jnp.where(vis, jnp.arange(n), -1)
            ix = self.indexer
            if ix is not None and n:  # training stages: the indexer reads detached inputs
                ud, qd = (
                    (u, qr) if indexer == "off" else (jax.lax.stop_gradient(a) for a in (u, qr))
                )
                w, iq, keys = ix.head_weights(ud), ix.queries(qd, pos), ix.compressor(ud)
                if indexer == "dense":  # KL over every visible entry: their scores
                    sc = ix.weighted_scores(w, iq, keys)
                    core["scores"] = jnp.take_along_axis(sc, jnp.maximum(core["comp"], 0), -1)
                else:  # the top-k, and for the KL their scores
                    core["comp"], picked = ix.pick(w, iq, keys, jnp.arange(s), self.ratio)
                    if indexer == "sparse":
                        core["scores"] = picked
        o, kl = self._mix(core)
        return remat.name(self.project(o, pos), "attn_out"), kl

    def _mix(self, core: dict):
        """The sequence-mixing core -> (context [B, S, H, K], KL terms): the window rows and
        the compressed entries `comp` ([B, S, k] indices into `entries`, -1 none) in one
        pool, one sparse attention (and the indexer KL against `scores` when given).

        On a mesh it runs per device in a `shard_map` over the batch (and, without the KL,
        head) axes: the Pallas kernels need it (GSPMD cannot partition a kernel call), and the
        reference's gather of pool rows then never meets XLA's SPMD partitioner."""
        bat = constraints.mesh_axes("batch", core["q"].shape[0])
        # heads are independent: split them too, unless the KL sums probabilities over them
        heads = () if "scores" in core else constraints.mesh_axes("heads", core["q"].shape[2])
        if not (bat or heads):  # no rules, or nothing to split
            return self._mix_local(core)
        specs = {k: P(bat or None, *(None,) * (v.ndim - 1)) for k, v in core.items()}
        specs["q"] = P(bat or None, None, heads or None, None)
        run = constraints.shard_map(
            lambda c, sink: self._mix_local(c, sink, bat),
            in_specs=(specs, P(heads or None)),
            out_specs=(specs["q"], (P(), P())),
        )
        return run(core, self.attn_sink[...])

    def _mix_local(self, core: dict, sink=None, reduce_over: tuple[str, ...] = ()):
        """`_mix` on local arrays; `sink` (default: the layer's), the KL summed over
        `reduce_over` (the batch's mesh axes, inside the shard_map)."""
        q, pool = core["q"], core["kv"]
        b, s = q.shape[:2]
        win = prefill_window_idx(s, self.cfg.window_size)  # [S, W]
        idx = jnp.broadcast_to(win, (b, *win.shape))
        kl = (jnp.zeros((), F32), jnp.zeros((), F32))
        if self.ratio:
            comp = core["comp"]
            idx = jnp.concatenate([idx, jnp.where(comp >= 0, comp + s, -1)], axis=-1)
            pool = jnp.concatenate([pool, core["entries"]], axis=1)
            if "scores" in core:
                kl = self._indexer_kl(q, pool, idx, comp, core["scores"], sink)
                kl = jax.lax.psum(kl, reduce_over) if reduce_over else kl
        q, pool = remat.name(q, "attn_q"), remat.name(pool, "attn_kv")
        return self.attend(q, pool, idx.astype(jnp.int32), sink), kl

    def _indexer_kl(self, q, pool, idx, comp, logits, sink=None):
        """KL(p || softmax(index scores)) over the entries `comp` [B, S, k] of each query, whose
        index scores are `logits` [B, S, k]: p = this layer's attention probabilities of those
        entries (the sink and the window in the denominator, as the attention uses them),
        summed over heads (detached)."""
        sg = jax.lax.stop_gradient
        sink = self.attn_sink[...] if sink is None else sink
        probs = attention_probs(sg(q), sg(pool), idx, sg(sink), self.cfg)
        mass = jnp.sum(probs[..., -comp.shape[-1] :], axis=2)  # [B, S, k]
        return indexer_kl(sg(mass), logits, comp >= 0)

    def _freqs(self) -> np.ndarray:
        return np.asarray(self.freqs, np.float32)

    def _impl(self) -> str:
        return self.kernels  # the op resolves "auto" by backend (kernels on GPU / TPU)


def attention_probs(q, pool, idx, sink, cfg: ModelConfig) -> jnp.ndarray:
    """The attention probabilities [B, S, H, K] of `sparse_attention` (rows pool[idx], -1 =
    none; the sink in each head's denominator), float32."""
    valid = idx >= 0
    rows = jnp.take_along_axis(pool[:, None], jnp.maximum(idx, 0)[..., None], axis=2)
    scores = jnp.einsum("bshd,bskd->bshk", q.astype(F32), rows.astype(F32), precision=HI)
    scores = jnp.where(valid[:, :, None, :], scores * F32(cfg.head_dim**-0.5), -jnp.inf)
    sink = jnp.broadcast_to(sink.astype(F32)[:, None], (*scores.shape[:-1], 1))
    return jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]


def round_straight_through(x: jnp.ndarray, dtype) -> jnp.ndarray:
    """x rounded to `dtype` (returned float32) with an identity gradient: a float32 master
    weight's gradient is not rounded with it (straight-through, V4 report §3.4)."""
    return straight_through(lambda a: a.astype(dtype).astype(F32), x.astype(F32))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def straight_through(fn, x):
    """fn(x) with the identity as its derivative (fn: a hashable rounding of x)."""
    return fn(x)


@straight_through.defjvp
def _straight_through_jvp(fn, primals, tangents):
    return fn(primals[0]), tangents[0]


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
