"""The sparse-attention op: window + compressed entries + sink, one softmax (`sparse_attn_kernel`).

    sparse_attention(q, kv, idx, sink, *, scale, implementation="auto") -> [B, S, H, D]

Each query token attends, with all its heads, to the rows `kv[b, idx[b, s, :]]` of a shared
K = V pool (its sliding window and its compressed entries; -1 = no entry), with a per-head
sink logit in the denominator. `implementation`:

- `"reference"`: the pure-jnp specification (`reference.py`), any backend, differentiable.
- `"pallas"`: the Pallas kernel of the default backend: Triton on GPU (`pallas_gpu.py`),
  Mosaic on TPU (`pallas_tpu.py`); on CPU the GPU kernel in Pallas' interpreter (slow: for
  tests). `interpret=True/False` overrides the interpreter choice.
- `"auto"`: the kernel on GPU and TPU, the reference on CPU.

Gradients (`jax.custom_vjp`, all implementations): the forward saves its output and each
softmax's log-sum-exp; the backward is `reference_bwd.py` (the pure-jnp specification) for
`"reference"` and the backend's backward kernel for `"pallas"` (`pallas_gpu_bwd.py`,
`pallas_tpu_bwd.py`), so training runs kernel forward + kernel backward. `idx` gets no
gradient. Forward-mode differentiation (`jax.jvp`) is not defined. Under a mesh, call the op
inside `jax.shard_map` (the kernels see one device's tokens and heads; GSPMD cannot partition
a Pallas call).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from v4jax.kernels.sparse_attention.blocks import BackwardBlockSizes, BlockSizes
from v4jax.kernels.sparse_attention.reference import reference_forward
from v4jax.kernels.sparse_attention.reference_bwd import (
    backward_stats,
    sparse_attention_reference_bwd,
)

__all__ = [
    "sparse_attention",
    "IMPLEMENTATIONS",
    "BlockSizes",
    "BackwardBlockSizes",
    "resolve_implementation",
]

IMPLEMENTATIONS = ("reference", "pallas", "auto")
_KERNEL_BACKENDS = ("gpu", "tpu")


def resolve_implementation(implementation: str, backend: str | None = None) -> str:
    """ "auto" -> "pallas" on GPU/TPU, "reference" elsewhere; the others unchanged."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    return "pallas" if backend in _KERNEL_BACKENDS else "reference"


def sparse_attention(
    q: jnp.ndarray,  # [B, S, H, D]
    kv: jnp.ndarray,  # [B, N, D]
    idx: jnp.ndarray,  # [B, S, K] int32, -1 = none
    sink: jnp.ndarray,  # [H]
    *,
    scale: float,
    implementation: str = "auto",
    interpret: bool | None = None,
    blocks: BlockSizes | None = None,
    backward_blocks: BackwardBlockSizes | None = None,
) -> jnp.ndarray:  # [B, S, H, D] in q.dtype
    """Softmax(q . kv[idx] * scale with a per-head sink) @ kv[idx], per query token.

    `interpret` (kernels only): None = the interpreter exactly when the default backend is
    neither GPU nor TPU. `blocks`, `backward_blocks`: kernel tiling of the forward and the
    backward (`blocks.py`; defaults per backend and shape).
    """
    _check(q, kv, idx, sink)
    if resolve_implementation(implementation) == "reference":
        return _op(q, kv, idx, sink, float(scale), _Config("reference"))
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend not in _KERNEL_BACKENDS
    kernel = "tpu" if backend == "tpu" else "gpu"
    cfg = _Config(kernel, bool(interpret), blocks, backward_blocks)
    return _op(q, kv, idx, sink, float(scale), cfg)


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static part of one call: which forward/backward pair, and its tiling."""

    kernel: str  # reference | gpu | tpu
    interpret: bool = False
    blocks: BlockSizes | None = None
    backward_blocks: BackwardBlockSizes | None = None


def _forward(q, kv, idx, sink, scale, cfg: _Config, return_lse: bool):
    if cfg.kernel == "reference":
        o, lse = reference_forward(q, kv, idx, sink, scale=scale)
        return (o, lse) if return_lse else o
    if cfg.kernel == "tpu":
        from v4jax.kernels.sparse_attention.pallas_tpu import sparse_attention_tpu as fn
    else:
        from v4jax.kernels.sparse_attention.pallas_gpu import sparse_attention_gpu as fn
    kw = dict(scale=scale, blocks=cfg.blocks, interpret=cfg.interpret, return_lse=return_lse)
    return fn(q, kv, idx, sink, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _op(q, kv, idx, sink, scale, cfg):
    return _forward(q, kv, idx, sink, scale, cfg, return_lse=False)


def _op_fwd(q, kv, idx, sink, scale, cfg):
    o, lse = _forward(q, kv, idx, sink, scale, cfg, return_lse=True)
    return o, (q, kv, idx, sink, o, lse)


def _op_bwd(scale, cfg, res, g):
    q, kv, idx, sink, o, lse = res
    delta, dsink = backward_stats(o, g, sink, lse)
    args = (q, kv, idx, lse, delta, g)
    if cfg.kernel == "reference":
        dq, dkv = sparse_attention_reference_bwd(*args, scale=scale)
    else:
        if cfg.kernel == "tpu":
            from v4jax.kernels.sparse_attention.pallas_tpu_bwd import sparse_attention_tpu_bwd as fn
        else:
            from v4jax.kernels.sparse_attention.pallas_gpu_bwd import sparse_attention_gpu_bwd as fn
        kw = dict(scale=scale, blocks=cfg.backward_blocks, interpret=cfg.interpret)
        dq, dkv = fn(*args, **kw)
    return dq, dkv, None, dsink


_op.defvjp(_op_fwd, _op_bwd)


def _check(q, kv, idx, sink) -> None:
    """Clear errors for mis-shaped inputs (the kernels would fail deep inside lowering)."""
    if q.ndim != 4 or kv.ndim != 3 or idx.ndim != 3 or sink.ndim != 1:
        raise ValueError(
            "sparse_attention expects q [B, S, H, D], kv [B, N, D], idx [B, S, K], sink [H]; "
            f"got q {q.shape}, kv {kv.shape}, idx {idx.shape}, sink {sink.shape}"
        )
    b, s, h, d = q.shape
    if kv.shape[0] != b or kv.shape[2] != d or idx.shape[:2] != (b, s) or sink.shape != (h,):
        raise ValueError(
            f"sparse_attention shapes disagree: q {q.shape} (B, S, H, D), kv {kv.shape} "
            f"(B, N, D), idx {idx.shape} (B, S, K), sink {sink.shape} (H,)"
        )
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"sparse_attention: idx must be integer, got {idx.dtype}")
