"""`prefill` and `decode_step` for a `Model`: input checks, then one jitted pure function of
(parameter state, tokens, cache, lengths).

The checks cost no device-to-host transfer per step: token ids are range-checked only when they
come from the host (ids already on the device, e.g. sampled by the model, are taken as they
are), and the cache-length check uses the host copy of the positions that every step leaves in
`DecodeCache.host_pos` (read from the device once for a cache that lacks it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from v4jax.decode.cache import DecodeCache
from v4jax.decode.chunk import forward_chunk
from v4jax.numerics.policy import jit

__all__ = ["decode_step", "prefill"]


@jit(static_argnums=0)
def _chunk(graphdef, state, tokens, cache, lengths):
    return forward_chunk(nnx.merge(graphdef, state), tokens, cache, lengths)


def prefill(model, tokens, cache: DecodeCache, lengths=None):
    """Right-padded tokens [B, S] (+ valid lengths [B]) continuing each sequence at its cache
    position -> (logits of each sequence's last valid token [B, V], updated cache)."""
    tokens = model._check_tokens(tokens)
    b, s = tokens.shape
    if b != cache.batch_size:
        raise ValueError(f"tokens have batch {b}, the cache holds {cache.batch_size} sequences")
    lengths = np.full((b,), s, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if lengths.shape != (b,) or lengths.min() < 0 or lengths.max() > s:
        raise ValueError(f"lengths {lengths.tolist()}: need [B] values in [0, {s}]")
    known = cache.host_pos if cache.host_pos is not None else np.asarray(cache.pos)
    end = known + lengths
    if end.max() > cache.max_len:
        i = int(end.argmax())
        raise ValueError(
            f"sequence {i} would reach {int(end[i])} tokens, longer than the "
            f"cache (max_len={cache.max_len})"
        )
    if model.mesh is not None:
        logits, new = _sharded_chunk(model)(model.state, tokens, cache, jnp.asarray(lengths))
    else:
        logits, new = _chunk(model.graphdef, model.state, tokens, cache, jnp.asarray(lengths))
    return logits, dataclasses.replace(new, host_pos=end.astype(np.int32))


def _sharded_chunk(model):
    """The chunk step jitted on the model's mesh: parameters as placed, the rules active at
    trace time (activation constraints, expert-parallel MoE); cache shardings propagate."""
    fns = model._sharded_fns
    if "chunk" not in fns:
        mesh, rules = sharding.auto(model.mesh), sharding.rules_for(model.rules)
        params = sharding.state_shardings(model.state, mesh, rules)
        graphdef = model.graphdef

        def step(state, tokens, cache, lengths):
            with sharding.use_rules(mesh, rules):
                return forward_chunk(nnx.merge(graphdef, state), tokens, cache, lengths)

        fns["chunk"] = jit(step, in_shardings=(params, None, None, None))
    return fns["chunk"]


def decode_step(model, tokens, cache: DecodeCache):
    """One new token per sequence [B] -> (logits [B, V], updated cache)."""
    t = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
    if t.ndim != 1:
        raise ValueError(f"decode_step takes one token per sequence [B], got shape {t.shape}")
    return prefill(model, t[:, None], cache)
