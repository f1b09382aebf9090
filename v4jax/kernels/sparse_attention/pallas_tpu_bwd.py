"""Backward of the sparse attention on TPU: a Pallas kernel for Mosaic TPU.

Same math as the GPU backward (`pallas_gpu_bwd.py`; specification: `reference_bwd.py`) with the
forward's TPU structure (`pallas_tpu.py`): one program per query token with all heads, the
index list walked in steps of 128 rows, each row one DMA from HBM, double-buffered. Per step

    P = exp(q . rows^T * scale - lse), dS = P (dO . rows^T - Delta)      [Hp, 128] fp32
    dq += dS . rows  (fp32 VMEM scratch)     c = scale dS^T . q + P^T . dO       [128, D] fp32

dkv: a TPU has no atomics, and Mosaic's grid runs sequentially on a core, so the kernel keeps
the whole fp32 dkv of one sequence in VMEM as an output block indexed by the sequence only
(the grid's token axis is "arbitrary": every token of a sequence revisits the same block, which
is written back to HBM once, after its last token). Each step adds the rows of c into it one
entry at a time (a scalar-addressed [1, D] read-modify-write; repeated indices simply add
twice; -1 entries are skipped). Deterministic, and no HBM traffic for dkv but the final write.

The limit: the block is N x D x 4 bytes, double-buffered by the pipeline: 2 x 5,120 rows x 512
x 4 B = 20 MiB for a 4K-token training sequence of a CSA layer (its window rows plus S / 4
compressed entries). Pools past `DKV_VMEM_BUDGET` (40 MiB: 10,240 rows at D = 512) raise;
longer sequences need a pool-chunked variant (read-modify-write of the touched dkv rows by
DMA, with repeated indices of a step summed first), not written yet.

Tested only in the TPU interpreter and by lowering to Mosaic on a CPU host (see `pallas_tpu.py`
for what a real TPU may still object to; here also the dynamic-row read-modify-write of an
fp32 [N, D] VMEM block and the transposed-LHS products).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from v4jax.kernels.sparse_attention.blocks import BackwardBlockSizes, tpu_backward_block_sizes
from v4jax.kernels.sparse_attention.common import HI, scores
from v4jax.kernels.sparse_attention.pallas_gpu_bwd import pad_backward_inputs

__all__ = ["sparse_attention_tpu_bwd", "DKV_VMEM_BUDGET"]

# Bytes for the double-buffered fp32 dkv block: 10,240 rows at D = 512. With 16 MiB for the
# rest (q, dO, dq blocks and scratch: < 3 MiB at 128 heads) it stays under 64 MiB of VMEM
# (v7x has 64 MiB per core; v5e / v6e 128 MiB).
DKV_VMEM_BUDGET = 40 << 20
_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, dims, precision=HI, preferred_element_type=jnp.float32)


def _kernel(
    idx_smem,  # [1, Kp] int32 (SMEM)
    idx_vmem,  # [1, Kp] int32
    lse_ref,  # [Hp, 1] f32
    delta_ref,  # [Hp, 1] f32
    q_ref,  # [Hp, D]
    g_ref,  # [Hp, D]
    kv_hbm,  # [B, N, D] (HBM, whole pool)
    dq_ref,  # [Hp, D]
    dkv_ref,  # [N, D] f32, this sequence's, resident across its tokens
    buf,  # [2, R, D] gathered rows, double-buffered
    sem,  # DMA semaphores [2]
    dq_acc,  # [Hp, D] f32
    c_ref,  # [R, D] f32: this step's dkv contributions
    *,
    scale: float,
    steps: int,
):
    b, t = pl.program_id(0), pl.program_id(1)
    rows = buf.shape[1]

    def dmas(step, slot, start: bool):
        def one(r, carry):
            row = idx_smem[0, step * rows + r]

            @pl.when(row >= 0)
            def _():
                cp = pltpu.make_async_copy(
                    kv_hbm.at[b, pl.ds(row, 1)], buf.at[slot, pl.ds(r, 1)], sem.at[slot]
                )
                cp.start() if start else cp.wait()

            return carry

        jax.lax.fori_loop(0, rows, one, 0, unroll=8)

    @pl.when(t == 0)
    def _():
        dkv_ref[...] = jnp.zeros(dkv_ref.shape, jnp.float32)

    buf[...] = jnp.zeros(buf.shape, buf.dtype)  # -1 slots: finite data (P = 0 there)
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
    dmas(0, 0, start=True)

    def step(j, carry):
        slot = j % 2

        @pl.when(j + 1 < steps)
        def _():
            dmas(j + 1, 1 - slot, start=True)

        dmas(j, slot, start=False)
        q, g, tile = q_ref[...], g_ref[...], buf[slot]  # tile [R, D]
        valid = idx_vmem[:, pl.ds(pl.multiple_of(j * rows, rows), rows)] >= 0  # [1, R]
        p = jnp.exp(scores(q, tile, valid, scale) - lse_ref[...])  # [Hp, R]
        ds = p * (_dot(g, tile, _NT) - delta_ref[...])
        ds_c, p_c = ds.astype(q.dtype), p.astype(q.dtype)
        dq_acc[...] += _dot(ds_c, tile, _NN)
        c_ref[...] = _dot(ds_c, q, _TN) * jnp.float32(scale) + _dot(p_c, g, _TN)

        def add(r, carry):
            row = idx_smem[0, j * rows + r]

            @pl.when(row >= 0)
            def _():
                dkv_ref[pl.ds(row, 1), :] += c_ref[pl.ds(r, 1), :]

            return carry

        jax.lax.fori_loop(0, rows, add, 0, unroll=8)
        return carry

    jax.lax.fori_loop(0, steps, step, 0)
    dq_ref[...] = (dq_acc[...] * jnp.float32(scale)).astype(dq_ref.dtype)


def sparse_attention_tpu_bwd(
    q: jnp.ndarray,  # [B, S, H, D]
    kv: jnp.ndarray,  # [B, N, D]
    idx: jnp.ndarray,  # [B, S, K] int32, -1 = none
    lse: jnp.ndarray,  # [B, S, H] f32, from the forward
    delta: jnp.ndarray,  # [B, S, H] f32, `reference_bwd.backward_stats`
    g: jnp.ndarray,  # [B, S, H, D] cotangent of the output
    *,
    scale: float,
    blocks: BackwardBlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jnp.ndarray, jnp.ndarray]:  # dq [B, S, H, D] q.dtype, dkv [B, N, D] kv.dtype
    """The Mosaic TPU backward kernel; `interpret=True` runs it in the TPU interpreter."""
    b, s, h, d = q.shape
    n = kv.shape[1]
    need = 2 * n * d * 4
    if need > DKV_VMEM_BUDGET:
        raise ValueError(
            f"TPU sparse-attention backward: a pool of {n} rows x {d} needs {need >> 20} MiB "
            f"of VMEM for dkv, over DKV_VMEM_BUDGET ({DKV_VMEM_BUDGET >> 20} MiB)"
        )
    blocks = blocks or tpu_backward_block_sizes(h, d)
    if interpret is True:
        interpret = pltpu.InterpretParams()  # uninitialised buffers are NaN: poisoned outputs
    q, g, lse, delta, idx = pad_backward_inputs(
        q, g, lse, delta, idx, heads=blocks.heads, rows=blocks.rows
    )
    hp, kp = q.shape[2], idx.shape[2]
    tok = lambda i, t: (i, t, 0, 0)
    dq, dkv = pl.pallas_call(
        functools.partial(_kernel, scale=scale, steps=kp // blocks.rows),
        grid=(b, s),
        in_specs=[
            pl.BlockSpec((None, None, 1, kp), tok, memory_space=pltpu.SMEM),
            pl.BlockSpec((None, None, 1, kp), tok),
            pl.BlockSpec((None, None, hp, 1), tok),
            pl.BlockSpec((None, None, hp, 1), tok),
            pl.BlockSpec((None, None, hp, d), tok),
            pl.BlockSpec((None, None, hp, d), tok),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[
            pl.BlockSpec((None, None, hp, d), tok),
            pl.BlockSpec((None, n, d), lambda i, t: (i, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, d), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((2, blocks.rows, d), kv.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((hp, d), jnp.float32),
            pltpu.VMEM((blocks.rows, d), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=need + (16 << 20),
        ),
        interpret=interpret,
        name="v4_sparse_attention_bwd",
    )(idx[:, :, None, :], idx[:, :, None, :], lse, delta, q, g, kv)
    return dq[:, :, :h], dkv.astype(kv.dtype)
