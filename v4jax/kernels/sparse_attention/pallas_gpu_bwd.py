"""Backward of the sparse attention on GPU: a Pallas kernel for the Triton backend.

Computes the gradients of `reference_bwd.py` (the specification: dS = P (dP - Delta) with P from
the forward's saved log-sum-exp, P and dS rounded to the input dtype before their products).
One program per (query token, block of heads), as the forward (`pallas_gpu.py`): it walks the
token's index list in blocks of `rows` entries, gathers the K = V rows once per block, and

    s  = q . rows^T * scale      P = exp(s - lse)       dP = dO . rows^T     [Hb, rows] fp32
    dS = P (dP - Delta)          dq += dS . rows                             [Hb, D] fp32
    c  = scale dS^T . q + P^T . dO                                           [rows, D] fp32

and adds each row of c into dkv[idx] with fp32 atomic adds (into an fp32 copy of the pool,
cast to the pool dtype after the launch). dq stays in registers and is written once.

Why atomics and not a second pass over a row -> query mapping: a row's gradient needs, from
every (token, entry) that selected it, that token's q and dO for all heads (H x D each, 128 x
larger than the row itself at V4's 128 heads) or the [H] columns of its P and dS (which would
first have to be written out: [B, S, H, K], gigabytes at training lengths). The per-entry
contribution c is instead a by-product of the dq pass, one MMA pair per block, and an atomic
add moves exactly it. The DeepSeek V3.2 sparse-MLA backward (tilelang examples) makes the same
choice. The cost: fp32 atomics make dkv's summation order (hence its last bits) vary from run
to run; dq and dsink are deterministic.

Entries of -1 are masked off the gather and the atomics. An index repeated in one block is
summed by the atomics themselves. Pallas' generic interpreter (CPU tests) implements an atomic
add as gather-add-scatter, which supports no mask and drops all but one of repeated addresses;
interpreted, the kernel therefore first sums each block's repeated rows with a [rows, rows]
equality matrix (c <- E c) and sends every entry but the first of each index, and the -1
entries, to distinct spare rows past the pool (zero or duplicate sums, sliced off). The math of
c and dq is the same code on both paths; only how entries are kept out of the atomics differs.

`Delta = rowsum(o * dO)` and dsink are elementwise over the output and computed outside the
kernel (`reference_bwd.backward_stats`), as FlashAttention-2's preprocessing step does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from v4jax.kernels.sparse_attention.blocks import BackwardBlockSizes, gpu_backward_block_sizes
from v4jax.kernels.sparse_attention.common import HI, scores

__all__ = ["sparse_attention_gpu_bwd", "pad_backward_inputs"]

_NN = (((1,), (0,)), ((), ()))  # [M, K] x [K, N]
_NT = (((1,), (1,)), ((), ()))  # [M, K] x [N, K]
_TN = (((0,), (0,)), ((), ()))  # [K, M] x [K, N]


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, dims, precision=HI, preferred_element_type=jnp.float32)


def _add_rows(dkv_ref, ids, valid, c, *, spare: int, interpret: bool):
    """dkv_ref[ids[r]] += c[r] for the valid entries; ids [R], c [R, D] fp32."""
    r, d = c.shape
    cols = jnp.arange(d, dtype=jnp.int32)[None, :]
    if not interpret:
        mask = jnp.broadcast_to(valid[:, None], (r, d))
        plt.atomic_add(dkv_ref, (jnp.maximum(ids, 0)[:, None], cols), c, mask=mask)
        return
    same = (ids[:, None] == ids[None, :]) & valid[:, None]  # [R, R]: entry j repeats entry i
    earlier = jnp.arange(r)[None, :] < jnp.arange(r)[:, None]
    first = valid & ~jnp.any(same & earlier, axis=1)
    c = _dot(same.astype(jnp.float32), c, _NN)  # each entry: the sum over its repeats
    target = jnp.where(first, ids, spare + jnp.arange(r, dtype=jnp.int32))
    plt.atomic_add(dkv_ref, (target[:, None], cols), c)


def _kernel(q_ref, g_ref, lse_ref, delta_ref, kv_ref, idx_ref, _, dq_ref, dkv_ref, **kw):
    """q_ref, g_ref [Hb, D]; lse_ref, delta_ref [Hb, 1] fp32; kv_ref [N, D] (this sequence's
    pool); idx_ref [Kp]; `_` the zeroed fp32 dkv buffer aliased to dkv_ref [N + rows, D]."""
    scale, steps, r, interpret = kw["scale"], kw["steps"], kw["rows"], kw["interpret"]
    q, g = q_ref[...], g_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    hb, d = q.shape
    dt = q.dtype
    spare = dkv_ref.shape[0] - r
    cols = jnp.arange(d, dtype=jnp.int32)[None, :]

    def block(j, dq):
        ids = idx_ref[pl.ds(j * r, r)]  # [R]
        valid = ids >= 0
        mask = jnp.broadcast_to(valid[:, None], (r, d))
        rows = plt.load(kv_ref.at[jnp.maximum(ids, 0)[:, None], cols], mask=mask, other=0)
        p = jnp.exp(scores(q, rows, valid[None, :], scale) - lse)  # [Hb, R], 0 where masked
        ds = p * (_dot(g, rows, _NT) - delta)
        ds_c, p_c = ds.astype(dt), p.astype(dt)
        c = _dot(ds_c, q, _TN) * jnp.float32(scale) + _dot(p_c, g, _TN)  # [R, D]
        _add_rows(dkv_ref, ids, valid, c, spare=spare, interpret=interpret)
        return dq + _dot(ds_c, rows, _NN)

    dq = jax.lax.fori_loop(0, steps, block, jnp.zeros((hb, d), jnp.float32))
    dq_ref[...] = (dq * jnp.float32(scale)).astype(dq_ref.dtype)


def pad_backward_inputs(q, g, lse, delta, idx, *, heads: int, rows: int):
    """Heads padded to a multiple of `heads` (zero q and dO, lse +inf: P = 0, nothing flows),
    the index list to a multiple of `rows` (with -1). lse, delta -> [B, S, Hp, 1] fp32."""
    h, k = q.shape[2], idx.shape[2]
    hp, kp = -(-h // heads) * heads, -(-k // rows) * rows
    pad_h = lambda x, v=0.0: jnp.pad(x, ((0, 0), (0, 0), (0, hp - h)), constant_values=v)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0)))
    g = jnp.pad(g.astype(q.dtype), ((0, 0), (0, 0), (0, hp - h), (0, 0)))
    lse = pad_h(lse.astype(jnp.float32), jnp.inf)[..., None]
    delta = pad_h(delta.astype(jnp.float32))[..., None]
    idx = jnp.pad(idx.astype(jnp.int32), ((0, 0), (0, 0), (0, kp - k)), constant_values=-1)
    return q, g, lse, delta, idx


def sparse_attention_gpu_bwd(
    q: jnp.ndarray,  # [B, S, H, D]
    kv: jnp.ndarray,  # [B, N, D]
    idx: jnp.ndarray,  # [B, S, K] int32, -1 = none
    lse: jnp.ndarray,  # [B, S, H] f32, from the forward
    delta: jnp.ndarray,  # [B, S, H] f32, `reference_bwd.backward_stats`
    g: jnp.ndarray,  # [B, S, H, D] cotangent of the output
    *,
    scale: float,
    blocks: BackwardBlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jnp.ndarray, jnp.ndarray]:  # dq [B, S, H, D] q.dtype, dkv [B, N, D] kv.dtype
    """The Triton backward kernel; `interpret=True` runs it in Pallas' generic interpreter."""
    b, s, h, d = q.shape
    n = kv.shape[1]
    blocks = blocks or gpu_backward_block_sizes(h, d)
    if d & (d - 1):
        raise ValueError(f"head dim {d}: the Triton kernel needs a power of two")
    hb, r = blocks.heads, blocks.rows
    q, g, lse, delta, idx = pad_backward_inputs(q, g, lse, delta, idx, heads=hb, rows=r)
    hp, kp = q.shape[2], idx.shape[2]
    grp = hp // hb  # a 1-D grid, head blocks fastest (see `pallas_gpu.py`)
    div, rem = jax.lax.div, jax.lax.rem
    tok = lambda i: (div(div(i, grp), s), rem(div(i, grp), s))
    head_block = pl.BlockSpec((None, None, hb, d), lambda i: (*tok(i), rem(i, grp), 0))
    stat_block = pl.BlockSpec((None, None, hb, 1), lambda i: (*tok(i), rem(i, grp), 0))
    pool = lambda rows: pl.BlockSpec((None, rows, d), lambda i: (tok(i)[0], 0, 0))
    dq, dkv = pl.pallas_call(
        functools.partial(_kernel, scale=scale, steps=kp // r, rows=r, interpret=interpret),
        grid=(b * s * grp,),
        in_specs=[
            head_block,
            head_block,
            stat_block,
            stat_block,
            pool(n),
            pl.BlockSpec((None, None, kp), lambda i: (*tok(i), 0)),
            pool(n + r),
        ],
        out_specs=[head_block, pool(n + r)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n + r, d), jnp.float32),
        ],
        input_output_aliases={6: 1},  # dkv accumulates into a zeroed fp32 buffer
        compiler_params=plt.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
        name="v4_sparse_attention_bwd",
    )(q, g, lse, delta, kv, idx, jnp.zeros((b, n + r, d), jnp.float32))
    return dq[:, :, :h], dkv[:, :n].astype(kv.dtype)
