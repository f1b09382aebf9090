"""Formats and rounding: release weight formats, quant-dequant simulations, numerics policy."""

from v4jax.numerics.formats import FP4_VALUES, dequant_fp4, dequant_fp8_blocks, unpack_fp4
from v4jax.numerics.policy import Numerics, Precision
from v4jax.numerics.quant import fp4_quant_dequant, fp8_quant_dequant, hadamard, pow2_scale

__all__ = [
    "FP4_VALUES",
    "Numerics",
    "Precision",
    "dequant_fp4",
    "dequant_fp8_blocks",
    "fp4_quant_dequant",
    "fp8_quant_dequant",
    "hadamard",
    "pow2_scale",
    "unpack_fp4",
]
