"""Full size without memory: abstract shapes only (jax.eval_shape), parameter counts."""

import v4jax


def test_flash_counts():
    c = v4jax.count_params(v4jax.config.flash())
    assert round(c["total"] / 1e9, 1) == 284.3  # advertised 284B; shapes: 284.33B
    assert 13.0e9 < c["active"] < 13.4e9  # ~13.3B activated excluding the embedding
    assert round(c["mtp"] / 1e9, 1) == 6.6


def test_pro_counts():
    c = v4jax.count_params(v4jax.config.pro())
    assert round(c["total"] / 1e9) == 1573  # 1573.0B backbone, from the shapes
    assert round((c["total"] + c["mtp"]) / 1e9, 1) == 1598.8  # with MTP ~1.6T
    assert 48.5e9 < c["active"] < 49.5e9  # ~48.9B, advertised 49B


def test_flash_abstract_model_has_release_layout():
    import jax.numpy as jnp
    from flax import nnx

    from v4jax.model import Transformer
    from v4jax.numerics import Precision

    m = nnx.eval_shape(lambda: Transformer(v4jax.config.flash(), Precision()))
    pair = m.segments[2]  # 20 x (HCA, CSA)
    assert pair.blocks[1].attn.wq_b.weight.shape == (20, 32768, 1024)
    assert pair.blocks[1].attn.wq_b.weight.dtype == jnp.float8_e4m3fn
    assert pair.blocks[0].ffn.experts.w1.shape == (20, 256, 2048, 2048)  # packed FP4
    assert pair.blocks[0].ffn.experts.w1.dtype == jnp.int8
