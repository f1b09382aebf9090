"""`layers.matmul_operands`: the switch back to float32-HIGHEST operands for the activation-dtype
matmuls (issue 16, item 4: bf16 operands + float32 accumulation is the default; the float32
form is kept for benchmarks against the old numerics, `scripts/bench_decode.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.model import layers
from v4jax.numerics import Numerics, Precision
from v4jax.numerics.policy import jit

BF16 = Precision(Numerics.BF16, jnp.bfloat16)
HI = jax.lax.Precision.HIGHEST
F32 = jnp.float32


def _operands(seed: int = 0):
    """float32 values with full 24-bit mantissas, so a bf16 cast of them changes them."""
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (2, 5, 256)), jax.random.normal(kw, (128, 256))


def test_float32_mode_is_the_explicit_highest_einsum():
    x, w = _operands()
    f = jit(lambda x, w: layers.mm_act(x, w, BF16))
    with layers.matmul_operands("float32"):
        got = np.asarray(f(x, w))
    # the same contraction at the same precision: bitwise
    want = jnp.einsum("...i,oi->...o", x, w, precision=HI)
    np.testing.assert_array_equal(got, np.asarray(want))
    # and the default is the bf16-operand form, which differs on these operands (the switch
    # is what changed the result, not a no-op on both sides)
    default = np.asarray(f(x, w))
    bf = jnp.einsum(
        "...i,oi->...o", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=F32
    )
    np.testing.assert_array_equal(default, np.asarray(bf))
    assert np.max(np.abs(default - got)) > 1e-3  # bf16 rounding of 256-term sums of N(0, 1)


def test_switch_is_in_the_jit_cache_key():
    x, w = _operands(1)
    traces = []

    @jit
    def f(x, w):
        traces.append(1)
        return layers.act_einsum("bsi,oi->bso", x, w, BF16)

    a = f(x, w)
    with layers.matmul_operands("float32"):
        b = f(x, w)
    c = f(x, w)
    assert len(traces) == 2  # traced once per mode, the default reused from the cache
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_linear_under_float32_mode_matches_highest_reference():
    """A release-format FP8 linear (bf16 numerics: no activation quantisation) gives the float32
    HIGHEST product of its input and its dequantised weight."""
    lin = layers.Linear(256, 128, fmt="fp8", axes=("embed", "mlp"), prec=BF16)
    kw, kx = jax.random.split(jax.random.key(2))
    lin.weight.set_value((2 * jax.random.normal(kw, (128, 256))).astype(jnp.float8_e4m3fn))
    lin.scale.set_value(jnp.full((1, 2), 2.0**-3, F32).astype(jnp.float8_e8m0fnu))
    x = jax.random.normal(kx, (3, 256))
    with layers.matmul_operands("float32"):
        got = np.asarray(lin(x, out_dtype=F32))
    w = lin.weight[...].astype(F32) * 2.0**-3
    np.testing.assert_array_equal(got, np.asarray(jnp.einsum("si,oi->so", x, w, precision=HI)))


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="matmul_operands='bf16'"):
        with layers.matmul_operands("bf16"):
            pass
