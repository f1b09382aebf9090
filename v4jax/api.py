"""The public API (`DESIGN.md`): `load`, `init`, `count_params` and the `Model` they return.

A `Model` is data: a config, a numerics policy, the NNX graph definition and the parameter
state (release formats kept). Its methods are jit-compiled pure functions of that state.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.release import load_release_arrays
from v4jax.checkpoint.safetensors import INDEX_FILE, SINGLE_FILE
from v4jax.checkpoint.synthetic import random_release_tensors
from v4jax.config import ModelConfig, from_json
from v4jax.decode import init_cache
from v4jax.decode import steps as decode_steps
from v4jax.kernels.sparse_attention import IMPLEMENTATIONS
from v4jax.model.transformer import Transformer
from v4jax.numerics import Numerics, Precision

__all__ = ["Model", "count_params", "init", "load"]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded DeepSeek-V4 model: config + numerics + parameter state."""

    config: ModelConfig
    precision: Precision
    graphdef: nnx.GraphDef
    state: nnx.State
    kernels: str = "auto"

    @property
    def module(self) -> Transformer:
        """The NNX module (merged view of graphdef and state)."""
        return nnx.merge(self.graphdef, self.state)

    def layer(self, index: int):
        """The NNX `Block` of main-stack layer `index` (a slice of its stacked segment), for
        inspection and component tests."""
        from v4jax.checkpoint.names import layer_slots

        if not 0 <= index < self.config.num_layers:
            raise IndexError(f"layer {index} outside [0, {self.config.num_layers})")
        seg, rep, pos = layer_slots(self.config)[index]
        gd, st = nnx.split(self.module.segments[seg])
        return nnx.merge(gd, jax.tree.map(lambda a: a[rep], st)).blocks[pos]

    def logits(self, tokens) -> jax.Array:
        """int32 tokens [B, S] at positions 0..S-1 -> float32 logits [B, S, V]."""
        return _logits(self.graphdef, self.state, self._check_tokens(tokens))

    def mtp_logits(self, tokens, next_tokens) -> jax.Array:
        """MTP block logits [B, S, V]: main streams of `tokens`, the MTP fed `next_tokens`
        (position i holds token i+1; the logits predict token i+2)."""
        t, n = self._check_tokens(tokens), self._check_tokens(next_tokens, "next_tokens")
        if t.shape != n.shape:
            raise ValueError(f"tokens {t.shape} and next_tokens {n.shape} differ in shape")
        return _mtp_logits(self.graphdef, self.state, t, n)

    # ---- decode (v4jax.decode owns the state; these are thin entry points) ----
    def init_cache(self, batch_size: int, max_len: int):
        """An empty `DecodeCache` for `batch_size` sequences of up to `max_len` tokens."""
        return init_cache(self.config, batch_size, max_len, self.precision.dtype)

    def prefill(self, tokens, cache, lengths=None):
        """Right-padded tokens [B, S] (+ lengths [B]) from each sequence's cache position ->
        (logits of each sequence's last valid token [B, V], cache). Any start position."""
        return decode_steps.prefill(self, tokens, cache, lengths)

    def decode_step(self, tokens, cache):
        """One token per sequence [B] -> (logits [B, V], cache)."""
        return decode_steps.decode_step(self, tokens, cache)

    def _check_tokens(self, tokens, what: str = "tokens") -> jax.Array:
        t = jnp.asarray(tokens)
        if t.ndim != 2 or not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError(f"{what}: expected an integer array [B, S], got {t.dtype}{t.shape}")
        if t.shape[1] == 0:
            raise ValueError(f"{what}: empty sequence")
        if not isinstance(t, jax.core.Tracer):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"{what}: ids must be in [0, {self.config.vocab_size}), found [{lo}, {hi}]"
                )
        return t.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _mtp_logits(graphdef, state, tokens, next_tokens):
    return nnx.merge(graphdef, state).mtp_logits(tokens, next_tokens)


def _precision(numerics: str | Numerics, dtype) -> Precision:
    mode = Numerics.parse(numerics)
    return Precision(mode, jnp.bfloat16 if dtype is None else dtype)


def _abstract(cfg: ModelConfig, prec: Precision, kernels: str):
    if kernels not in IMPLEMENTATIONS:
        raise ValueError(f"kernels={kernels!r}: expected one of {IMPLEMENTATIONS}")
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, prec, kernels)))


def _leaves(state: nnx.State) -> dict[tuple, jax.ShapeDtypeStruct]:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def _build(cfg, prec, kernels, source, progress: bool) -> Model:
    graphdef, abstract = _abstract(cfg, prec, kernels)
    arrays = load_release_arrays(source, cfg, _leaves(abstract), progress=progress)
    flat = [(p, v.replace(jnp.asarray(arrays[tuple(p)]))) for p, v in nnx.to_flat_state(abstract)]
    return Model(cfg, prec, graphdef, nnx.from_flat_state(flat), kernels)


def load(
    path: str | os.PathLike,
    *,
    numerics: str = "reference",
    dtype=None,
    mesh=None,
    kernels: str = "auto",
    progress: bool = True,
) -> Model:
    """Loads an official release folder (config.json + safetensors shards)."""
    path = os.fspath(path)
    prec = _precision(numerics, dtype)
    if mesh is not None:
        raise NotImplementedError("mesh placement is not implemented yet (sharding issue)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    has_weights = any(os.path.exists(os.path.join(path, f)) for f in (INDEX_FILE, SINGLE_FILE))
    if not (os.path.exists(os.path.join(path, "config.json")) and has_weights):
        raise CheckpointError(
            f"{path}: not an official release folder (needs config.json and "
            f"{INDEX_FILE} or {SINGLE_FILE})"
        )
    return _build(from_json(path), prec, kernels, path, progress)


def init(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    numerics: str = "reference",
    dtype=None,
    kernels: str = "auto",
) -> Model:
    """Random weights in the release layout (FP8 / FP4 + E8M0, as `v4jax.checkpoint.synthetic`)."""
    tensors: Mapping[str, np.ndarray] = random_release_tensors(cfg, seed)
    return _build(cfg, _precision(numerics, dtype), kernels, tensors, False)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from abstract shapes (no allocation).

    `total`: main stack + embedding + head (the advertised 284B / 1.6T exclude the MTP block,
    reported as `mtp`). `active`: parameters used per token, i.e. total minus the unused routed
    experts and minus the embedding table (a lookup, as the spec's 13.3B / 48.9B count it).
    FP4 bytes count two parameters; E8M0 scales and `tid2eid` are not parameters."""
    _, abstract = _abstract(cfg, Precision(Numerics.BF16, jnp.float32), "auto")
    total = routed = mtp = 0
    for path, v in nnx.to_flat_state(abstract):
        a = v.get_value()
        if a.dtype in (jnp.float8_e8m0fnu, jnp.int32):
            continue
        n = int(np.prod(a.shape)) * (2 if a.dtype == jnp.int8 else 1)
        if path[0] == "mtp":
            mtp += n
            continue
        total += n
        if "experts" in path and "shared_experts" not in path:
            routed += n
    embed = cfg.vocab_size * cfg.dim
    active = total - embed - routed + routed * cfg.experts_per_token // cfg.num_experts
    return {"total": total, "active": active, "mtp": mtp}
