"""The release weight encodings, written once for the host (numpy) and for `jit` (jax).

Spec: the release's convert.py. FP8: e4m3 [..., O, I] with one E8M0 scale per 128x128
block, 2^ceil(log2(amax / 448)). FP4: e2m1 packed two per int8 (low nibble = even element,
bit 3 = sign) [..., O, I/2], with one E8M0 scale per 32 inputs, 2^ceil(log2(amax / 6)). Both
round to nearest even; an all-zero block gets the smallest scale 2^-127.

One implementation serves checkpoint conversion (numpy arrays: host memory, no device, no
compilation per block shape) and training (jax arrays, traced: `v4jax/train/model.py` quantises
its masters with the same recipe): every function picks numpy or jax.numpy from the type of its
input (`_xp`), so the two paths cannot drift apart. The scale is exact: `frexp` gives the
binade of amax, compared with the mantissa of qmax, with no rounded division or logarithm. The
scaled values are exact too (multiplying by a power of two), so the only rounding is the
encoding's own.

Not to be confused with `quant.py`: quant-dequant simulations of the kernels' *activation*
quantisation (an amax floor, a scale from a rounded reciprocal) whose numbers differ on purpose.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from v4jax.numerics.formats import FP4_VALUES
from v4jax.numerics.quant import FP4_MAX, FP8_MAX

__all__ = [
    "FP4_BLOCK",
    "FP8_BLOCK",
    "dequantize_fp4",
    "dequantize_fp8_blocks",
    "e8m0",
    "fake_quantize_fp4",
    "fake_quantize_fp8",
    "pow2_exponent",
    "quantize_fp4_rows",
    "quantize_fp8_blocks",
]

FP8_BLOCK, FP4_BLOCK = 128, 32
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
_E2M1_CODE = np.array([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], np.uint8)  # code of 2 * |value|


def _xp(x):
    """jax.numpy for jax arrays (tracers included), numpy for everything else."""
    return jnp if isinstance(x, jax.Array) else np


def _bitcast(x, dtype):
    return x.view(dtype) if isinstance(x, np.ndarray) else jax.lax.bitcast_convert_type(x, dtype)


def _f32(x):
    xp = _xp(x)
    return xp.asarray(x, dtype=xp.float32)


def pow2_exponent(amax, qmax: float):
    """Smallest e in [-127, 127] with qmax * 2^e >= amax, i.e. exactly ceil(log2(amax / qmax))
    clamped to the E8M0 range (zero amax -> -127, inf -> 127); int32, shape of `amax`."""
    xp = _xp(amax)
    qm, qe = math.frexp(qmax)
    m, x = xp.frexp(_f32(amax))  # amax = m * 2^x, m in [0.5, 1)
    e = x - qe + (m > qm).astype(xp.int32)
    e = xp.where(amax > 0, xp.where(xp.isinf(amax), 127, e), -127)
    return xp.clip(e, -127, 127).astype(xp.int32)


def e8m0(exp):
    """Exponent e (int, [-127, 127]) -> the E8M0 scale byte 2^e."""
    return _bitcast((exp + 127).astype(_xp(exp).uint8), E8M0)


def _e8m0_f32(scale):
    """E8M0 scales (or their raw uint8 bytes) -> float32 2^e (exact)."""
    return (_bitcast(scale, E8M0) if scale.dtype == np.uint8 else scale).astype(np.float32)


def _fp8_parts(w):
    """[..., O, I] float32 -> (e4m3 [..., O, I], block exponents [..., ceil(O/128),
    ceil(I/128)], the exponents repeated to [..., O, I])."""
    xp, b = _xp(w), FP8_BLOCK
    *lead, o, i = w.shape
    bo, bi = -(-o // b), -(-i // b)
    pad = xp.pad(xp.abs(w), [(0, 0)] * len(lead) + [(0, bo * b - o), (0, bi * b - i)])
    exp = pow2_exponent(xp.max(pad.reshape(*lead, bo, b, bi, b), axis=(-3, -1)), FP8_MAX)
    full = xp.repeat(xp.repeat(exp, b, axis=-2), b, axis=-1)[..., :o, :i]
    q = xp.clip(xp.ldexp(w, -full), -FP8_MAX, FP8_MAX)  # exact: a power-of-two scaling
    return q.astype(ml_dtypes.float8_e4m3fn), exp, full


def _fp4_parts(w):
    """[..., O, I] float32 -> (|e2m1 value| [..., O, I] float32, sign bits, exponents
    [..., O, I/32])."""
    xp = _xp(w)
    *lead, o, i = w.shape
    if i % FP4_BLOCK:
        raise ValueError(f"FP4 rows need a multiple of {FP4_BLOCK} inputs, got shape {w.shape}")
    blocks = w.reshape(*lead, o, i // FP4_BLOCK, FP4_BLOCK)
    exp = pow2_exponent(xp.max(xp.abs(blocks), axis=-1), FP4_MAX)
    q = xp.clip(xp.ldexp(blocks, -exp[..., None]), -FP4_MAX, FP4_MAX).reshape(w.shape)
    # Round to nearest even on the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}: `rint` (ties to
    # even) at the grid's step within each binade (0.5 below 2, 1 below 4, 2 up to 6) lands
    # on the even code at every midpoint.
    a = xp.abs(q)
    per = xp.where(a < 2, np.float32(2), xp.where(a < 4, np.float32(1), np.float32(0.5)))
    return xp.rint(a * per) / per, xp.signbit(q), exp


def quantize_fp8_blocks(w):
    """float [..., O, I] -> (e4m3 [..., O, I], E8M0 [..., ceil(O/128), ceil(I/128)])."""
    q, exp, _ = _fp8_parts(_f32(w))
    return q, e8m0(exp)


def quantize_fp4_rows(w):
    """float [..., O, I] -> (int8 packed [..., O, I/2], E8M0 [..., O, I/32])."""
    xp = _xp(w)
    mag, neg, exp = _fp4_parts(_f32(w))
    codes = xp.asarray(_E2M1_CODE)[(mag * 2).astype(xp.int32)] | (neg.astype(xp.uint8) << 3)
    return _bitcast(codes[..., 0::2] | (codes[..., 1::2] << 4), np.int8), e8m0(exp)


def fake_quantize_fp8(w):
    """float32 [..., O, I] -> the float32 value of its FP8 encoding (quantise, dequantise)."""
    q, _, full = _fp8_parts(w)
    return _xp(w).ldexp(q.astype(np.float32), full)


def fake_quantize_fp4(w):
    """float32 [..., O, I] -> the float32 value of its FP4 encoding (-0 reads as +0)."""
    xp = _xp(w)
    mag, neg, exp = _fp4_parts(w)
    val = xp.where(neg & (mag > 0), -mag, mag)
    *lead, o, i = w.shape
    blocks = val.reshape(*lead, o, i // FP4_BLOCK, FP4_BLOCK)
    return xp.ldexp(blocks, exp[..., None]).reshape(w.shape)


def dequantize_fp8_blocks(w, scale):
    """e4m3 [..., O, I] + E8M0 [..., ceil(O/128), ceil(I/128)] -> float32 [..., O, I] (exact)."""
    xp = _xp(w)
    o, i = w.shape[-2:]
    s = _e8m0_f32(scale)
    s = xp.repeat(xp.repeat(s, FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)[..., :o, :i]
    return w.astype(np.float32) * s


def dequantize_fp4(packed, scale):
    """int8 [..., O, I/2] + E8M0 [..., O, I/32] -> float32 [..., O, I] (code 8, -0, reads as
    +0, as the release's own convert.py)."""
    xp = _xp(packed)
    b = _bitcast(packed, np.uint8)
    codes = xp.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
    values = xp.asarray(FP4_VALUES)[codes.astype(xp.int32)]
    return values * xp.repeat(_e8m0_f32(scale), FP4_BLOCK, axis=-1)
