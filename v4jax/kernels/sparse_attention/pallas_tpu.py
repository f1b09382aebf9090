"""Sparse MQA with a sink on TPU: a Pallas kernel for Mosaic TPU.

Same algorithm as the GPU kernel (`pallas_gpu.py`, `common.py`): one program per query token,
all heads at once (q [H, D] and the fp32 accumulator [H, D] stay in VMEM: at most
128 x 512 x 4 B = 256 KB), the index list walked in steps of 128 gathered rows, each step
folded into the online softmax as two 64-entry blocks (the reference's rounding points).

The gather: a TPU vector unit cannot load from HBM by address, so each row is one DMA. The
token's index list is a pipelined SMEM block (scalars to address the DMAs) and a VMEM block
(the [1, 128] validity mask of the score tile). Rows are double-buffered: the DMAs of step j+1
are issued before step j's products. Entries of -1 issue no DMA; their slot keeps finite data
(zeroed at the start, or a previous step's rows) that the -inf score mask multiplies by 0.

Tested only in the TPU interpreter (`interpret=pltpu.InterpretParams(...)`, which simulates
the DMAs and semaphores on CPU and detects races) and by lowering to Mosaic on a CPU host; it
has not run on a TPU, where Mosaic's own layout passes may still object. Likely first issues:
single-row DMAs into a packed bf16 VMEM tile (16 rows per sublane tile), the 64-lane slices of
the [H, 128] score tile, and one DMA per 1 KB row (batching rows per semaphore may be needed to
keep the DMA engines busy). Prefill runs the decode kernel once per token (see `pallas_gpu.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from v4jax.kernels.sparse_attention.blocks import SOFTMAX_BLOCK, BlockSizes, tpu_block_sizes
from v4jax.kernels.sparse_attention.common import (
    finish,
    log_sum_exp,
    online_update,
    pad_inputs,
    scores,
)

__all__ = ["sparse_attention_tpu"]


def _kernel(
    idx_smem,  # [1, Kp] int32 (SMEM)
    idx_vmem,  # [1, Kp] int32
    sink_ref,  # [Hp, 1] f32
    q_ref,  # [Hp, D]
    kv_hbm,  # [B, N, D] (HBM, whole pool)
    o_ref,  # [Hp, D]
    lse_ref,  # [Hp, 1] f32
    buf,  # [2, R, D] gathered rows, double-buffered
    sem,  # DMA semaphores [2]
    m_ref,  # [Hp, 1] f32
    l_ref,  # [Hp, 1] f32
    acc_ref,  # [Hp, D] f32
    *,
    scale: float,
    steps: int,
):
    b = pl.program_id(0)
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

    buf[...] = jnp.zeros(buf.shape, buf.dtype)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    dmas(0, 0, start=True)

    def step(j, carry):
        slot = j % 2

        @pl.when(j + 1 < steps)
        def _():
            dmas(j + 1, 1 - slot, start=True)

        dmas(j, slot, start=False)
        q = q_ref[...]
        tile = buf[slot]  # [R, D]
        valid = idx_vmem[:, pl.ds(pl.multiple_of(j * rows, rows), rows)] >= 0  # [1, R]
        s = scores(q, tile, valid, scale)  # [Hp, R]
        state = (m_ref[...], l_ref[...], acc_ref[...])
        for c in range(0, rows, SOFTMAX_BLOCK):
            blk = slice(c, c + SOFTMAX_BLOCK)
            state = online_update(*state, s[:, blk], tile[blk], q.dtype)
        m_ref[...], l_ref[...], acc_ref[...] = state
        return carry

    jax.lax.fori_loop(0, steps, step, 0)
    o_ref[...] = finish(m_ref[...], l_ref[...], acc_ref[...], sink_ref[...]).astype(o_ref.dtype)
    lse_ref[...] = log_sum_exp(m_ref[...], l_ref[...], sink_ref[...])


def sparse_attention_tpu(
    q: jnp.ndarray,  # [B, S, H, D]
    kv: jnp.ndarray,  # [B, N, D]
    idx: jnp.ndarray,  # [B, S, K] int32, -1 = none
    sink: jnp.ndarray,  # [H] float32
    *,
    scale: float,
    blocks: BlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams = False,
    return_lse: bool = False,
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:  # [B, S, H, D] q.dtype[, [B, S, H] f32]
    """The Mosaic TPU kernel; `interpret=True` runs it in the TPU interpreter (any host).
    `return_lse=True`: also each softmax's log-sum-exp (sink included), for the backward."""
    b, s, h, d = q.shape
    blocks = blocks or tpu_block_sizes(h, d)
    if interpret is True:
        interpret = pltpu.InterpretParams()  # uninitialised buffers are NaN: poisoned outputs
    q, idx, sink = pad_inputs(q, idx, sink, heads=blocks.heads, rows=blocks.rows)
    hp, kp = q.shape[2], idx.shape[2]
    tok = lambda i, t: (i, t, 0, 0)
    out, lse = pl.pallas_call(
        functools.partial(_kernel, scale=scale, steps=kp // blocks.rows),
        grid=(b, s),
        in_specs=[
            pl.BlockSpec((None, None, 1, kp), tok, memory_space=pltpu.SMEM),
            pl.BlockSpec((None, None, 1, kp), tok),
            pl.BlockSpec((hp, 1), lambda i, t: (0, 0)),
            pl.BlockSpec((None, None, hp, d), tok),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=[
            pl.BlockSpec((None, None, hp, d), tok),
            pl.BlockSpec((None, None, hp, 1), tok),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, s, hp, 1), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((2, blocks.rows, d), kv.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((hp, 1), jnp.float32),
            pltpu.VMEM((hp, 1), jnp.float32),
            pltpu.VMEM((hp, d), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="v4_sparse_attention_fwd",
    )(idx[:, :, None, :], idx[:, :, None, :], sink[:, None], q, kv)
    return (out[:, :, :h], lse[:, :, :h, 0]) if return_lse else out[:, :, :h]
