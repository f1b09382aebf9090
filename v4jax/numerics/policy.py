"""Numerics modes (README, "Numerics modes") as a small frozen policy held by every module.

`Numerics.REFERENCE` reproduces the official inference kernels: FP8 activation quantisation in
the FP8/FP4 linears, FP8 simulation of the KV nope dims, Hadamard + FP4 simulation in the
indexer. `Numerics.BF16` is the same graph without those simulations (the fixtures' `smooth`
mode); with `dtype=float32` it runs entirely in float32 (the HF-parity form).
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp

__all__ = ["Numerics", "Precision"]


class Numerics(enum.Enum):
    REFERENCE = "reference"
    BF16 = "bf16"

    @classmethod
    def parse(cls, value: str | Numerics) -> Numerics:
        if isinstance(value, Numerics):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            msg = f"numerics={value!r}: unknown mode, expected one of {choices}"
            raise ValueError(msg) from None


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a module rounds: the numerics mode and the activation (storage) dtype.

    `dtype` is where the reference rounds to bf16; the fp32 islands of the reference (router,
    compressor, mHC, norms, head) stay float32 whatever `dtype` is.
    """

    numerics: Numerics = Numerics.REFERENCE
    dtype: jnp.dtype = jnp.bfloat16

    def __post_init__(self) -> None:
        dt = jnp.dtype(self.dtype)
        object.__setattr__(self, "dtype", dt)
        if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
            raise ValueError(f"dtype={dt}: expected bfloat16 or float32")
        if self.numerics is Numerics.REFERENCE and dt != jnp.dtype(jnp.bfloat16):
            raise ValueError(
                "dtype=float32 is only valid with numerics='bf16' (the reference rounds to bf16)"
            )

    @property
    def simulate_quant(self) -> bool:
        """Whether FP8/FP4 activation, KV and indexer quant-dequant simulations run."""
        return self.numerics is Numerics.REFERENCE

    def round(self, x: jnp.ndarray) -> jnp.ndarray:
        """Rounds a float32 value to the activation dtype and back (kept in float32)."""
        return x.astype(self.dtype).astype(jnp.float32)


# XLA may keep float32 where the program rounds to bf16 and back ("excess precision": it
# removes convert pairs inside fusions). The reference rounds at those points, and FP8
# activation rounding amplifies every skipped rounding (on the fixture, prefill logits of a
# 300-token prompt: max error 0.25 with excess precision allowed, 0.07 without). Every jit of
# model code therefore compiles with it disabled.
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}


def jit(fun=None, **kwargs):
    """`jax.jit` with `COMPILER_OPTIONS` (usable as a decorator, with or without arguments)."""
    import functools

    import jax

    if fun is None:
        return functools.partial(jit, **kwargs)
    return jax.jit(fun, compiler_options=COMPILER_OPTIONS, **kwargs)
