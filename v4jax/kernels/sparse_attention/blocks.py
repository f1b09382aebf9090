"""Block sizes of the sparse-attention kernels, and the one block size that is numerics.

`SOFTMAX_BLOCK` is not a tuning knob: the official `sparse_attn_kernel` walks the index list in
64-entry blocks, and its running max (hence the point where probabilities are rounded to bf16)
changes only between blocks. Every backend updates its online softmax once per 64 entries so it
rounds exactly where the reference (`reference.py`, `block=64`) does.

The backward has no online softmax (it normalises with the forward's log-sum-exp), so its row
block is a free tuning knob (`BackwardBlockSizes`).

Notation: H query heads, D head dim (512 in V4), K index-list entries
per query token.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "SOFTMAX_BLOCK",
    "BlockSizes",
    "BackwardBlockSizes",
    "gpu_block_sizes",
    "tpu_block_sizes",
    "gpu_backward_block_sizes",
    "tpu_backward_block_sizes",
]

SOFTMAX_BLOCK = 64


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling of one kernel launch.

    rows: index-list entries gathered per loop step, a multiple of `SOFTMAX_BLOCK`. The GPU
        kernel needs exactly 64 (Triton cannot slice a register tile into softmax blocks); the
        TPU kernel gathers 128 (a full lane tile of the score matrix) and updates twice.
    heads: query heads per program: the matrix M dimension of both products. All heads of a
        token share the gathered rows (MQA), so each row is read once per head block. Heads are
        zero-padded up to a multiple of it.
    num_warps, num_stages: Triton launch parameters (GPU only; ignored on TPU).
    """

    rows: int = SOFTMAX_BLOCK
    heads: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.rows % SOFTMAX_BLOCK or not _pow2(self.rows):
            raise ValueError(f"rows={self.rows}: expected a power of two multiple of 64")
        if not _pow2(self.heads) or self.heads < 8:
            raise ValueError(f"heads={self.heads}: expected a power of two >= 8")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps={self.num_warps}, num_stages={self.num_stages}")


def gpu_block_sizes(num_heads: int, head_dim: int) -> BlockSizes:
    """Triton defaults. Heads per program: at most 64, at least 16 (the smallest `tl.dot` M).

    64 heads x D=512 is a [64, 512] fp32 accumulator (128 KB): 8 warps give 128 registers per
    thread for it, about the most a program can hold; V4-Pro's 128 heads therefore run as two
    programs per token, each reading the token's rows (the second read mostly from L2), as
    FlashMLA does for 128 heads. Smaller head dims leave room for 4 warps.

    Compiled on the host for sm_90 (triton 3.8, not yet run on a GPU): 64 heads, 8 warps,
    2 stages: 192 KB shared memory, wgmma, 255 registers with ~0.5 KB of spills per thread;
    32 heads: 172 registers, no spills, but mma.sync and twice the row reads. Which is faster
    is for `scripts/bench_attention.py` on the GPU (it times both).
    """
    heads = min(64, max(16, 1 << (num_heads - 1).bit_length()))
    warps = 8 if heads * head_dim >= 64 * 512 else 4
    return BlockSizes(rows=SOFTMAX_BLOCK, heads=heads, num_warps=warps, num_stages=2)


def tpu_block_sizes(num_heads: int, head_dim: int) -> BlockSizes:
    """Mosaic TPU defaults: all heads in one program (q [H, D] and the fp32 accumulator live in
    VMEM, 128 x 512 x 4 B = 256 KB at most), 128 gathered rows per step (one lane tile of the
    [H, rows] score matrix), heads padded to a multiple of 16 (bf16 sublane packing)."""
    del head_dim
    heads = max(16, 1 << (num_heads - 1).bit_length())
    return BlockSizes(rows=2 * SOFTMAX_BLOCK, heads=heads)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackwardBlockSizes:
    """Tiling of one backward launch (`pallas_gpu_bwd.py`, `pallas_tpu_bwd.py`).

    rows: index-list entries gathered per loop step, a power of two >= 16 (`tl.dot`'s smallest
        dimension). Not numerics: the backward has no running max.
    heads: query heads per program, a power of two >= 16 (GPU: the M dimension of the dq and
        score products and the contraction of the dkv products); heads are zero-padded.
    num_warps, num_stages: Triton launch parameters (GPU only).
    """

    rows: int = 32
    heads: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if not _pow2(self.rows) or self.rows < 16:
            raise ValueError(f"rows={self.rows}: expected a power of two >= 16")
        if not _pow2(self.heads) or self.heads < 16:
            raise ValueError(f"heads={self.heads}: expected a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps={self.num_warps}, num_stages={self.num_stages}")


def gpu_backward_block_sizes(num_heads: int, head_dim: int) -> BackwardBlockSizes:
    """Triton defaults for the backward: 32 rows x up to 32 heads per program.

    A program holds two fp32 accumulators the forward does not have: dq [heads, D] across the
    loop and the per-step dkv contribution [rows, D]; at D = 512 each is 64 KB for 32 x 512, so
    32 x 32 with 8 warps is about what fits registers (the forward's 64 heads would double dq).
    Smaller head dims take the same blocks with 4 warps. Compiled on the host for sm_90
    (`tests/test_sparse_attention_grad.py` records shared memory and spills); timed on a GPU
    by `scripts/bench_attention.py --backward`.
    """
    heads = min(32, max(16, 1 << (num_heads - 1).bit_length()))
    warps = 8 if heads * head_dim >= 32 * 512 else 4
    return BackwardBlockSizes(rows=32, heads=heads, num_warps=warps, num_stages=2)


def tpu_backward_block_sizes(num_heads: int, head_dim: int) -> BackwardBlockSizes:
    """Mosaic TPU defaults: all heads in one program (as the forward), 128 rows per step (one
    lane tile of the [H, rows] score matrix)."""
    del head_dim
    heads = max(16, 1 << (num_heads - 1).bit_length())
    return BackwardBlockSizes(rows=128, heads=heads)
