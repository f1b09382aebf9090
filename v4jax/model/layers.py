"""Small building blocks: parameters with logical axes, RMSNorm, RoPE, release-format linears.

Notation (used in every model file): B batch, S tokens, D model dim, H heads, K head dim,
G output groups, R rank, E experts, F expert width, V vocab, C compressed entries,
N = hc_mult residual streams. Logical axis names (mapped to mesh axes in `sharding/rules.py`):
"vocab", "embed", "q_lora", "heads", "kv", "o_lora", "o_in", "experts", "mlp", "index",
"hc_mix", "hc", "ratio", "layers"; None = never sharded.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sharding import constraints
from v4jax.config import ModelConfig
from v4jax.numerics import Precision, dequant_fp4, dequant_fp8_blocks, fp8_quant_dequant

HI = jax.lax.Precision.HIGHEST
F32 = jnp.float32
MATMUL_OPERANDS = ("activation", "float32")
# read at trace time; a jit-cache-sensitive context, so a function traced under the other
# value is traced again (as `experts.implementation`)
_OPERANDS = jax.make_user_context("activation")


@contextlib.contextmanager
def matmul_operands(mode: str):
    """Selects the operands of the activation-dtype matmuls (`mm_act`, `act_einsum`) for code
    traced inside the block: "activation" (default: activation-dtype operands, float32
    accumulation) or "float32" (both operands float32 at HIGHEST precision, as the fp32
    islands: the port's original numerics, kept for benchmarks and comparisons). Part of jit's
    cache key."""
    if mode not in MATMUL_OPERANDS:
        raise ValueError(f"matmul_operands={mode!r}: expected one of {MATMUL_OPERANDS}")
    with _OPERANDS(mode):
        yield


def param(shape: tuple[int, ...], dtype, axes: tuple[str | None, ...], use_dtype=None) -> nnx.Param:
    """A zero-initialised parameter annotated with logical axis names (filled by the loader).
    `use_dtype`: the dtype every consumer casts it to before use (a weight whose only use is
    an activation-dtype matmul operand), so that a float32 master can be gathered for use in
    it (`gathered`)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    meta = {} if use_dtype is None else {"use_dtype": jnp.dtype(use_dtype)}
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=axes, eager_sharding=False, **meta)


def gathered(module: nnx.Module, whole: tuple[str, ...] = (), upcast: bool = False) -> nnx.Module:
    """`sharding.constraints.gathered` (each parameter gathered for use on a mesh; the dims of
    logical axes `whole` entirely), float32 masters of activation-dtype matmul operands cast
    to that dtype before the gather (their `use_dtype`; back to float32 after it with
    `upcast`), unless `matmul_operands("float32")` makes those matmuls float32."""
    cast = _OPERANDS.value == "activation"
    return constraints.gathered(module, cast=cast, whole=whole, upcast=upcast)


def mm(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """float32 x [..., I] @ w[O, I]^T at full precision (no TF32 / bf16 passes on GPU): the
    reference's float32 islands (router, mHC, head)."""
    return jnp.einsum("...i,oi->...o", x.astype(F32), w.astype(F32), precision=HI)


def mm_act(x: jnp.ndarray, w: jnp.ndarray, prec: Precision) -> jnp.ndarray:
    """x [..., I] @ w[O, I]^T -> float32, with both operands in the activation dtype and float32
    accumulation (bf16 tensor cores on GPU / TPU).

    Exact for what the quantised linears multiply: FP8 e4m3 / FP4 e2m1 values times power-of-two
    E8M0 scales, FP8-quantised activations and bf16 activations are all representable in bf16,
    and the product of two bf16 values is exact in float32, so only the summation order differs
    from `mm`. With `dtype=float32` (the HF-parity form) it is `mm`.
    """
    return act_einsum("...i,oi->...o", x, w, prec)


def act_einsum(spec: str, a: jnp.ndarray, b: jnp.ndarray, prec: Precision) -> jnp.ndarray:
    """`jnp.einsum(spec, a, b)` -> float32 for operands whose values are exact in the activation
    dtype (see `mm_act`): activation-dtype operands, float32 accumulation; float32 HIGHEST when
    the activation dtype is float32 or under `matmul_operands("float32")`."""
    if prec.dtype == jnp.dtype(F32) or _OPERANDS.value == "float32":
        return jnp.einsum(spec, a.astype(F32), b.astype(F32), precision=HI)
    dt = prec.dtype
    return jnp.einsum(spec, a.astype(dt), b.astype(dt), preferred_element_type=F32)


class RMSNorm(nnx.Module):
    """Weighted RMSNorm computed in float32, output in the activation dtype (as the reference)."""

    def __init__(self, dim: int, eps: float, prec: Precision, axis: str | None = "embed"):
        self.weight = param((dim,), jnp.bfloat16, (axis,))
        self.eps, self.prec = eps, prec

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return rms_norm(x, self.weight[...], self.eps).astype(self.prec.dtype)


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray | None, eps: float) -> jnp.ndarray:
    x = x.astype(F32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + F32(eps))
    return y if weight is None else y * weight.astype(F32)


# ---------------------------------------------------------------------------------------------
# RoPE (reference `precompute_freqs_cis`, `apply_rotary_emb`): interleaved pairs on the LAST
# rope dims; per-layer base; YaRN on r > 0 layers.


def rope_freqs(cfg: ModelConfig, ratio: int) -> np.ndarray:
    """Per-pair angular frequencies [rope_head_dim / 2] (float64 maths, float32 result)."""
    dim, yarn = cfg.rope_head_dim, ratio > 0 and cfg.original_seq_len > 0
    base = cfg.compress_rope_theta if ratio > 0 else cfg.rope_theta
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if yarn:

        def corr(rot: float) -> float:
            return dim * math.log(cfg.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(cfg.beta_fast)), 0)
        high = min(math.ceil(corr(cfg.beta_slow)), dim - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        freqs = freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)
    return freqs.astype(np.float32)


def freq_tuple(cfg: ModelConfig, ratio: int) -> tuple[float, ...]:
    """`rope_freqs` as a hashable tuple, stored as static module data."""
    return tuple(float(f) for f in rope_freqs(cfg, ratio))


def rope(x: jnp.ndarray, pos: jnp.ndarray, freqs, *, inverse: bool = False):
    """Rotates the last 2 * len(freqs) dims of x [B, S, ..., K] at positions pos [B, S].

    Complex products in float32, result rounded back to x.dtype (as the reference's in-place
    `apply_rotary_emb`). `inverse` applies the conjugate rotation (output de-rotation).
    """
    freqs = np.asarray(freqs, np.float32)
    rd = 2 * freqs.shape[0]
    ang = pos.astype(F32)[..., None] * jnp.asarray(freqs)  # [B, S, rd/2]
    ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + ang.shape[2:])
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    sin = -sin if inverse else sin
    r = x[..., -rd:].astype(F32).reshape(*x.shape[:-1], rd // 2, 2)
    re, im = r[..., 0], r[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    out = out.reshape(*x.shape[:-1], rd).astype(x.dtype)
    return jnp.concatenate([x[..., :-rd], out], axis=-1) if rd < x.shape[-1] else out


# ---------------------------------------------------------------------------------------------
# Linears in release formats (reference `Linear` and the FP8 / FP4 GEMMs of its kernel.py)


class Linear(nnx.Module):
    """y = x W^T with W kept in its release format and dequantised on the fly.

    `fmt`: "fp8" (e4m3 [O, I] + E8M0 [O/128, I/128]), "fp4" (packed e2m1 int8 [O, I/2] +
    E8M0 [O, I/32]) or "bf16". In the reference numerics the FP8/FP4 linears quantise their
    input per 128 values (E8M0 scales); since every scale is a power of two, the block-scaled
    FP8 GEMM equals a float32 GEMM of the dequantised operands up to summation order.
    """

    def __init__(self, in_dim: int, out_dim: int, *, fmt: str, axes: tuple, prec: Precision):
        self.fmt, self.prec = fmt, prec
        if fmt == "fp8":  # FP8 / FP4 weights are used as activation-dtype operands only
            self.weight = param((out_dim, in_dim), jnp.float8_e4m3fn, axes, prec.dtype)
            self.scale = param((-(-out_dim // 128), -(-in_dim // 128)), jnp.float8_e8m0fnu, axes)
        elif fmt == "fp4":
            self.weight = param((out_dim, in_dim // 2), jnp.int8, axes, prec.dtype)
            self.scale = param((out_dim, in_dim // 32), jnp.float8_e8m0fnu, axes)
        elif fmt == "bf16":
            self.weight = param((out_dim, in_dim), jnp.bfloat16, axes)
        else:
            raise ValueError(f"fmt={fmt!r}: expected 'fp8', 'fp4' or 'bf16'")

    def dequantized(self) -> jnp.ndarray:
        """The exact float32 weight [O, I]."""
        return dequant(self.fmt, self.weight[...], getattr(self, "scale", None))

    def __call__(self, x: jnp.ndarray, *, out_dtype=None) -> jnp.ndarray:
        x = xq = x.astype(F32)
        if self.fmt != "bf16" and self.prec.simulate_quant:
            xq = fp8_quant_dequant(x, 128)
        w = self.dequantized()
        y = mm(xq, w) if self.fmt == "bf16" else mm_act(xq, w, self.prec)  # bf16: fp32 islands
        if hasattr(self, "lora_a"):  # low-rank adapter (`v4jax.train.lora`): + s (x A^T) B^T
            h = act_einsum("...i,ri->...r", x, self.lora_a[...], self.prec)  # [..., R]
            y = y + self.lora_scale * act_einsum("...r,or->...o", h, self.lora_b[...], self.prec)
        return y.astype(out_dtype or self.prec.dtype)


def dequant(fmt: str, w: jnp.ndarray, scale: nnx.Param | jnp.ndarray | None) -> jnp.ndarray:
    """The float32 weight of a release-format leaf. A float32 leaf is a trainable master
    (`v4jax.train.model`, already fake-quantised there under QAT), and a bfloat16 leaf of an
    FP8 / FP4 format such a master cast for use (`gathered`): returned as is, scale unused."""
    if w.dtype == F32 or (fmt != "bf16" and w.dtype == jnp.bfloat16):
        return w
    s = scale[...] if isinstance(scale, nnx.Param) else scale
    if fmt == "fp8":
        return dequant_fp8_blocks(w, s)
    if fmt == "fp4":
        return dequant_fp4(w, s)
    return w.astype(F32)
