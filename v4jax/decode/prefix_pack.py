"""Compact layout of prefix-cache records: FP8 e4m3 nope dims + one power-of-two exponent per
64 of them, rope dims as they are (the layout V4 deployments store KV in; V4 report §3.6).

In reference numerics the nope dims of every cached K = V row (window rows and compressed
entries) are already FP8 quant-dequantised in 64-wide blocks with power-of-two scales (the
reference's `act_quant` on `kv[..., :-rope_dim]`), so each block is exactly e4m3 values times
2^e and this layout loses nothing: a [.., 512] bf16 row of 1,024 bytes becomes 448 + 7 + 128.
Packing is checked, not assumed: an array whose unpacked form is not bit-identical (e.g. the
"bf16" numerics mode, which does not simulate FP8) is stored as it is.

A packed record is [codes (uint8 [n], 1 = packed), then per array either the array, or its
(e4m3 codes as uint8, int8 exponents [..., nope/64], rope dims)]; any other record (its first
array is not a 1-D uint8 array) is a plain one and unpacks to itself.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["pack", "unpack"]

BLOCK = 64
F8 = ml_dtypes.float8_e4m3fn


def _encode(a: np.ndarray, nope: int):
    """-> (q uint8 [..., nope], e int8 [..., nope/64]) or None if not exactly representable."""
    x = a[..., :nope].astype(np.float32).reshape(*a.shape[:-1], nope // BLOCK, BLOCK)
    amax = np.abs(x).max(-1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.ceil(np.log2(amax / 448.0)), 0).astype(np.int32)
    if e.min(initial=0) < -126 or e.max(initial=0) > 127:
        return None
    q = np.ldexp(x, -e[..., None]).astype(F8)
    back = np.ldexp(q.astype(np.float32), e[..., None]).reshape(a[..., :nope].shape)
    same = back.astype(a.dtype).view(np.uint8) == np.ascontiguousarray(a[..., :nope]).view(np.uint8)
    if not same.all():
        return None
    return q.reshape(a[..., :nope].shape).view(np.uint8), e.astype(np.int8)


def pack(arrays: list[np.ndarray], head_dim: int, rope_dim: int) -> list[np.ndarray]:
    """The compact form of a record: every [..., head_dim] float array whose nope dims pack
    losslessly is packed; the rest are kept."""
    nope = head_dim - rope_dim
    codes, out = np.zeros(len(arrays), np.uint8), []
    for i, a in enumerate(arrays):
        fits = a.ndim and a.shape[-1] == head_dim and nope > 0 and nope % BLOCK == 0
        floaty = a.dtype in (np.float32, np.dtype(ml_dtypes.bfloat16))
        enc = _encode(a, nope) if fits and floaty and a.size else None
        if enc is None:
            out.append(a)
        else:
            codes[i] = 1
            out += [*enc, np.ascontiguousarray(a[..., nope:])]
    return [codes, *out]


def unpack(arrays: list[np.ndarray]) -> list[np.ndarray]:
    if not arrays or arrays[0].ndim != 1 or arrays[0].dtype != np.uint8:
        return arrays
    out, it = [], iter(arrays[1:])
    try:
        for code in arrays[0]:
            if code == 0:
                out.append(next(it))
                continue
            q, e, rope = next(it), next(it), next(it)
            x = np.ldexp(
                q.view(F8).astype(np.float32).reshape(*e.shape, BLOCK),
                e[..., None].astype(np.int32),
            )
            out.append(np.concatenate([x.reshape(q.shape).astype(rope.dtype), rope], axis=-1))
    except (StopIteration, ValueError, TypeError):
        return []  # malformed: matches no cache layout, so it is discarded as foreign
    return out
