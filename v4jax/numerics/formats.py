"""Release weight formats: FP8 e4m3 with E8M0 block scales, packed FP4 e2m1 with E8M0 scales.

Spec: the reference's `Linear` and convert.py. Dequantisation is exact in float32 (every product
of an e4m3 / e2m1 value and a power of two is representable), so a dequantised weight equals
the reference's bf16 / fp32 view of it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["FP4_VALUES", "e8m0_to_f32", "dequant_fp8_blocks", "dequant_fp4", "unpack_fp4"]

# e2m1 code -> value; code 8 (-0) reads as +0 as in the release's convert.py.
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


def e8m0_to_f32(s: jnp.ndarray) -> jnp.ndarray:
    """E8M0 byte e -> 2^(e - 127) as float32 (exact; 0xFF is NaN)."""
    return s.astype(jnp.float32)


def dequant_fp8_blocks(w: jnp.ndarray, scale: jnp.ndarray, block: int = 128) -> jnp.ndarray:
    """[O, I] e4m3 with [ceil(O/b), ceil(I/b)] scales -> float32 [O, I]."""
    o, i = w.shape
    s = e8m0_to_f32(scale)
    s = jnp.repeat(jnp.repeat(s, block, axis=0)[:o], block, axis=1)[:, :i]
    return w.astype(jnp.float32) * s


def unpack_fp4(packed: jnp.ndarray) -> jnp.ndarray:
    """int8 [O, I/2] (low nibble = even element) -> float32 e2m1 values [O, I]."""
    b = packed.astype(jnp.uint8)
    codes = jnp.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
    return jnp.asarray(FP4_VALUES)[codes.astype(jnp.int32)]


def dequant_fp4(packed: jnp.ndarray, scale: jnp.ndarray, block: int = 32) -> jnp.ndarray:
    """int8 [O, I/2] + E8M0 [O, I/32] -> float32 [O, I]."""
    return unpack_fp4(packed) * jnp.repeat(e8m0_to_f32(scale), block, axis=-1)
