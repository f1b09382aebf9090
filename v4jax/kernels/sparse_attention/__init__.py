"""The sparse-attention op: window + compressed entries + sink, one softmax (spec section 3.1).

    sparse_attention(q, kv, idx, sink, *, scale, implementation="auto") -> [B, S, H, D]

Each query token attends, with all its heads, to the rows `kv[b, idx[b, s, :]]` of a shared
K = V pool (its sliding window and its compressed entries; -1 = no entry), with a per-head
sink logit in the denominator. `implementation`:

- `"reference"`: the pure-jnp specification (`reference.py`), any backend, differentiable.
- `"pallas"`: the Pallas kernel of the default backend: Triton on GPU (`pallas_gpu.py`),
  Mosaic on TPU (`pallas_tpu.py`); on CPU the GPU kernel in Pallas' interpreter (slow: for
  tests). `interpret=True/False` overrides the interpreter choice.
- `"auto"`: the kernel on GPU and TPU, the reference on CPU.

The kernels are forward-only; their gradient is the reference's (`jax.custom_vjp`), so
`"auto"` stays usable for training. Under a mesh, call the op inside `jax.shard_map` (the
kernels see one device's tokens and heads; GSPMD cannot partition a Pallas call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from v4jax.kernels.sparse_attention.blocks import BlockSizes
from v4jax.kernels.sparse_attention.reference import sparse_attention_reference

__all__ = ["sparse_attention", "IMPLEMENTATIONS", "BlockSizes", "resolve_implementation"]

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
) -> jnp.ndarray:  # [B, S, H, D] in q.dtype
    """Softmax(q . kv[idx] * scale with a per-head sink) @ kv[idx], per query token.

    `interpret` (kernels only): None = the interpreter exactly when the default backend is
    neither GPU nor TPU. `blocks`: kernel tiling (`blocks.py`; defaults per backend and shape).
    """
    _check(q, kv, idx, sink)
    if resolve_implementation(implementation) == "reference":
        return sparse_attention_reference(q, kv, idx, sink, scale=scale)
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend not in _KERNEL_BACKENDS
    kernel = "tpu" if backend == "tpu" else "gpu"
    return _pallas(q, kv, idx, sink, float(scale), kernel, bool(interpret), blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _pallas(q, kv, idx, sink, scale, kernel, interpret, blocks):
    if kernel == "tpu":
        from v4jax.kernels.sparse_attention.pallas_tpu import sparse_attention_tpu as fn
    else:
        from v4jax.kernels.sparse_attention.pallas_gpu import sparse_attention_gpu as fn
    return fn(q, kv, idx, sink, scale=scale, blocks=blocks, interpret=interpret)


def _pallas_fwd(q, kv, idx, sink, scale, kernel, interpret, blocks):
    return _pallas(q, kv, idx, sink, scale, kernel, interpret, blocks), (q, kv, idx, sink)


def _pallas_bwd(scale, kernel, interpret, blocks, res, g):
    q, kv, idx, sink = res
    ref = lambda q, kv, sink: sparse_attention_reference(q, kv, idx, sink, scale=scale)
    dq, dkv, dsink = jax.vjp(ref, q, kv, sink)[1](g)
    return dq, dkv, None, dsink


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


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
