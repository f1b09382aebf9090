"""Model modules (Flax NNX): pure math, every parameter annotated with logical axis names."""

from v4jax.model.transformer import Transformer

__all__ = ["Transformer"]
