import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from v4jax.checkpoint.synthetic import dequantize_fp4, quantize_fp4_rows
from v4jax.numerics import dequant_fp4, fp4_quant_dequant, fp8_quant_dequant, hadamard, pow2_scale


def test_pow2_scale_is_ceil_log2():
    a = np.array([1e-4, 0.3, 448.0, 449.0, 1000.0, 2.0**-3 * 448], np.float32)
    prod = a * np.float32(1 / 448)  # the kernel's fp32 product, then an exact ceil-log2
    want = 2.0 ** np.ceil(np.log2(prod.astype(np.float64)))
    assert np.array_equal(np.asarray(pow2_scale(jnp.asarray(a), 1 / 448)), want.astype(np.float32))


def test_fp8_quant_dequant_against_ml_dtypes():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 256)) * rng.uniform(0.01, 100, (7, 1))).astype(np.float32)
    got = np.asarray(fp8_quant_dequant(jnp.asarray(x), 128))
    xb = x.reshape(7, 2, 128)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), 1e-4)
    s = 2.0 ** np.ceil(np.log2(amax / 448.0))
    want = np.clip(xb / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
    np.testing.assert_array_equal(got, want.reshape(7, 256).astype(np.float32))


def test_fp4_quant_dequant_rounds_to_nearest_even_grid():
    # block of 32 with amax 6 -> scale 1: values land on the e2m1 grid, ties to even code
    x = np.zeros((1, 32), np.float32)
    x[0, :9] = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.6]
    got = np.asarray(fp4_quant_dequant(jnp.asarray(x)))[0, :9]
    np.testing.assert_array_equal(got, [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -3.0])


def test_fp4_weight_dequant_matches_numpy_quantizer():
    w = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    packed, scale = quantize_fp4_rows(w)
    got = np.asarray(dequant_fp4(jnp.asarray(packed), jnp.asarray(scale)))
    np.testing.assert_array_equal(got, dequantize_fp4(packed, scale))


@pytest.mark.parametrize("n", [64, 128])
def test_hadamard_is_orthonormal(n):
    x = np.random.default_rng(2).standard_normal((3, n)).astype(np.float32)
    y = np.asarray(hadamard(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(hadamard(jnp.asarray(y))), x, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
