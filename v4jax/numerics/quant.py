"""Quant-dequant simulations of the official kernels (`inference/kernel.py`).

All functions take and return float32 arrays and are exact emulations of the reference's
`act_quant` / `fp4_act_quant` (power-of-two scales from the fp32 exponent-bit trick, e4m3
round-to-nearest-even, e2m1 round-to-nearest-even) and of the Hadamard rotation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pow2_scale", "fp8_quant_dequant", "fp4_quant_dequant", "hadamard"]

FP8_MAX = 448.0
FP4_MAX = 6.0
_FP4_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
_FP4_MIDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)


def pow2_scale(amax: jnp.ndarray, inv_max: float) -> jnp.ndarray:
    """2^ceil(log2(amax * fp32(inv_max))) via the fp32 exponent bits (exponent + 1 if the
    mantissa is non-zero), as the kernels' `fast_round_scale`."""
    x = amax.astype(jnp.float32) * jnp.float32(inv_max)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    exp = (bits >> 23) & 0xFF
    man = bits & ((1 << 23) - 1)
    e = exp + (man != 0).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(e << 23, jnp.float32)


def _blocks(x: jnp.ndarray, block: int) -> jnp.ndarray:
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the quantisation block {block}")
    return x.reshape(*x.shape[:-1], n // block, block)


# Both simulations pass gradients straight through (identity JVP): the rounding is piecewise
# constant and the e4m3 cast would flush cotangents to zero, so without it QAT (training in the
# reference numerics, `v4jax/train/model.py`) gets zero or wrong gradients. Forward values are
# unchanged.
@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fp8_quant_dequant(x: jnp.ndarray, block: int) -> jnp.ndarray:
    """Per-`block` FP8 e4m3 quant-dequant with E8M0 scales (amax floor 1e-4, clamp +-448)."""
    xb = _blocks(x.astype(jnp.float32), block)
    amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), 1e-4)
    s = pow2_scale(amax, 1.0 / FP8_MAX)
    q = jnp.clip(xb / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    return (q * s).reshape(x.shape)


def _round_e2m1(y: jnp.ndarray) -> jnp.ndarray:
    a = jnp.abs(y)
    idx = jnp.searchsorted(jnp.asarray(_FP4_MIDS), a, side="left")
    tie_up = (a == 0.75) | (a == 1.75) | (a == 3.5)  # midpoints whose even neighbour is above
    return jnp.sign(y) * jnp.asarray(_FP4_GRID)[idx + tie_up.astype(idx.dtype)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fp4_quant_dequant(x: jnp.ndarray, block: int = 32) -> jnp.ndarray:
    """Per-`block` FP4 e2m1 quant-dequant with E8M0 scales (amax floor 6 * 2^-126)."""
    xb = _blocks(x.astype(jnp.float32), block)
    amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), FP4_MAX * 2.0**-126)
    s = pow2_scale(amax, 1.0 / FP4_MAX)
    q = _round_e2m1(jnp.clip(xb / s, -FP4_MAX, FP4_MAX))
    return (q * s).reshape(x.shape)


@fp8_quant_dequant.defjvp
def _fp8_ste(block, primals, tangents):
    return fp8_quant_dequant(primals[0], block), tangents[0].astype(jnp.float32)


@fp4_quant_dequant.defjvp
def _fp4_ste(block, primals, tangents):
    return fp4_quant_dequant(primals[0], block), tangents[0].astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard(x: jnp.ndarray) -> jnp.ndarray:
    """Natural-order Sylvester Hadamard over the last dim, scaled by n^-0.5 (float32 out)."""
    n = x.shape[-1]
    h = jnp.asarray(_sylvester(n))
    y = jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST)
    return y * jnp.float32(n**-0.5)
