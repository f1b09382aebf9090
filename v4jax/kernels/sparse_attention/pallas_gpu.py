"""Sparse MQA with a sink on GPU: a Pallas kernel for the Triton backend.

One program per (query token, block of heads). It walks the token's index list in 64-entry
blocks: gathers the 64 K = V rows once (a masked pointer load: entries of -1 move no bytes),
computes the [heads, 64] fp32 scores with the heads as the matrix M dimension (MQA: every head
of the token reads the same rows), and folds them into an online softmax whose running max
changes once per block, rounding the probabilities to the query dtype before the P.V product
(fp32 accumulation), as the official `sparse_attn_kernel` does (`common.py`;
the reference's `kernel.py`). The sink enters the denominator only, at the end.

Why Triton and not Mosaic GPU (both are Pallas GPU backends in jax 0.11/0.12):
- The op is a row gather with a different index list per query. Triton expresses it as one
  pointer load of a [64, D] tile with per-row addresses and a mask; each row is a contiguous
  1 KB read (D = 512 bf16), and Triton's software pipeliner overlaps the next block's loads
  (`num_stages`) with this block's products. Mosaic GPU moves data with TMA; its only gather is
  TMA `gather4`, which is Blackwell-only (sm_100), so on the H100/H200 this project targets a
  Mosaic GPU kernel would issue 64 single-row TMA copies per block from one thread.
- `tl.dot` lowers to Hopper `wgmma` when M >= 64, which the 64-head block provides.
- The same kernel runs unchanged in Pallas' generic interpreter on CPU (the tests) and lowers
  to Triton IR on a machine without a GPU (`tests/test_sparse_attention_kernels.py` checks the
  lowering for an H100 target), so it can be checked without the hardware.
- Mosaic GPU's Pallas API is documented as unstable ("can change weekly"); the lent GPUs run
  jax 0.11.2 and this tree runs 0.12, and the Triton API is the same in both.
The cost: jax 0.12 deprecates the Pallas Triton backend (a DeprecationWarning at lowering;
removal "in a future JAX version"). The algorithm, blocking and tests carry over to a Mosaic
GPU port (per-row TMA on Hopper, `gather4` on Blackwell) when that becomes necessary.

Not done yet (noted for the next version): prefill runs the decode kernel once per query
token. Neighbouring prefill tokens share most of their 128-entry window; a banded causal loop
over a tile of tokens (window rows loaded once per tile, then each token's compressed entries)
would cut the window's reads by up to 128x. The loop also always runs over the whole padded
index list; a per-token count of valid blocks would let decode with a short context stop early.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from v4jax.kernels.sparse_attention.blocks import SOFTMAX_BLOCK, BlockSizes, gpu_block_sizes
from v4jax.kernels.sparse_attention.common import (
    finish,
    log_sum_exp,
    online_update,
    pad_inputs,
    scores,
)

__all__ = ["sparse_attention_gpu"]


def _kernel(q_ref, kv_ref, idx_ref, sink_ref, *rest, scale: float, steps: int):
    """q_ref [Hb, D], kv_ref [N, D] (this sequence's pool), idx_ref [Kp], sink_ref [Hb, 1];
    rest = ([a poisoned buffer aliased to the output,] o_ref [Hb, D], lse_ref [Hb, 1])."""
    o_ref, lse_ref = rest[-2:]
    q = q_ref[...]
    hb, d = q.shape
    r = SOFTMAX_BLOCK

    def block(j, carry):
        ids = idx_ref[pl.ds(j * r, r)]  # [64]
        valid = ids >= 0
        # A [64, D] gather; entries of -1 are masked off and read nothing. (Two broadcast index
        # arrays rather than `ids, :`: the interpreter's masked load takes only one kind.)
        mask = jnp.broadcast_to(valid[:, None], (r, d))
        at = (jnp.maximum(ids, 0)[:, None], jnp.arange(d, dtype=jnp.int32)[None, :])
        rows = plt.load(kv_ref.at[at], mask=mask, other=0)  # [64, D]
        s = scores(q, rows, valid[None, :], scale)  # [Hb, 64]
        return online_update(*carry, s, rows, q.dtype)

    init = (
        jnp.full((hb, 1), -jnp.inf, jnp.float32),
        jnp.zeros((hb, 1), jnp.float32),
        jnp.zeros((hb, d), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, steps, block, init)
    o_ref[...] = finish(m, l, acc, sink_ref[...]).astype(o_ref.dtype)
    lse_ref[...] = log_sum_exp(m, l, sink_ref[...])


def sparse_attention_gpu(
    q: jnp.ndarray,  # [B, S, H, D]
    kv: jnp.ndarray,  # [B, N, D]
    idx: jnp.ndarray,  # [B, S, K] int32, -1 = none
    sink: jnp.ndarray,  # [H] float32
    *,
    scale: float,
    blocks: BlockSizes | None = None,
    interpret: bool = False,
    poison: bool = False,
    return_lse: bool = False,
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:  # [B, S, H, D] in q.dtype[, [B, S, H] f32]
    """The Triton kernel; `interpret=True` runs it in Pallas' generic interpreter (any host).
    `poison=True` (tests): the output buffer starts as NaN, so unwritten elements show.
    `return_lse=True`: also each softmax's log-sum-exp (sink included), for the backward."""
    b, s, h, d = q.shape
    n = kv.shape[1]
    blocks = blocks or gpu_block_sizes(h, d)
    if blocks.rows != SOFTMAX_BLOCK:
        raise ValueError(f"the GPU kernel gathers {SOFTMAX_BLOCK} rows per step, got {blocks}")
    if d & (d - 1):
        raise ValueError(f"head dim {d}: the Triton kernel needs a power of two")
    hb = blocks.heads
    q, idx, sink = pad_inputs(q, idx, sink, heads=hb, rows=SOFTMAX_BLOCK)
    hp, kp = q.shape[2], idx.shape[2]
    # A 1-D grid over (token, head block), head blocks fastest: CUDA's first grid dimension
    # is the only one allowed past 65,535 (long prefill), and the programs that read the same
    # token's rows (V4-Pro: two head blocks), or overlapping windows (the next token), run
    # side by side, so the repeated reads come from L2.
    g = hp // hb
    div, rem = jax.lax.div, jax.lax.rem  # non-negative operands: no floor-division fix-ups
    tok = lambda i: (div(div(i, g), s), rem(div(i, g), s))
    head_block = pl.BlockSpec((None, None, hb, d), lambda i: (*tok(i), rem(i, g), 0))
    args = [q, kv, idx, sink[:, None]]
    specs = [
        head_block,
        pl.BlockSpec((None, n, d), lambda i: (tok(i)[0], 0, 0)),
        pl.BlockSpec((None, None, kp), lambda i: (*tok(i), 0)),
        pl.BlockSpec((hb, 1), lambda i: (rem(i, g), 0)),
    ]
    if poison:
        args, specs = [*args, jnp.full(q.shape, jnp.nan, q.dtype)], [*specs, head_block]
    out, lse = pl.pallas_call(
        functools.partial(_kernel, scale=scale, steps=kp // SOFTMAX_BLOCK),
        grid=(b * s * g,),
        in_specs=specs,
        out_specs=[head_block, pl.BlockSpec((None, None, hb, 1), head_block.index_map)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, s, hp, 1), jnp.float32),
        ],
        input_output_aliases={4: 0} if poison else {},
        compiler_params=plt.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
        name="v4_sparse_attention_fwd",
    )(*args)
    return (out[:, :, :h], lse[:, :, :h, 0]) if return_lse else out[:, :, :h]
