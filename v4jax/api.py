"""The public API (README, "API"): `load`, `init`, `count_params` and the `Model` they return.

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
from jax.sharding import NamedSharding

import sharding
from v4jax.checkpoint import convert, orbax_io
from v4jax.checkpoint.release import load_release_arrays
from v4jax.checkpoint.synthetic import random_release_tensors
from v4jax.config import ModelConfig, from_json
from v4jax.decode import init_cache
from v4jax.decode import steps as decode_steps
from v4jax.kernels.sparse_attention import IMPLEMENTATIONS
from v4jax.model.transformer import Transformer
from v4jax.numerics import Numerics, Precision
from v4jax.numerics.policy import jit as numerics_jit

__all__ = ["Model", "count_params", "export_hf", "init", "load"]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded DeepSeek-V4 model: config + numerics + parameter state."""

    config: ModelConfig
    precision: Precision
    graphdef: nnx.GraphDef
    state: nnx.State
    kernels: str = "auto"
    mesh: jax.sharding.Mesh | None = None  # set by load / init (mesh=): parameters placed on it
    rules: sharding.Rules | None = None  # the sharding regime of `mesh` (default DECODE)

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
        """int32 tokens [B, S] at positions 0..S-1 -> float32 logits [B, S, V].

        On a mesh: the tokens (the same on every process) are placed batch-sharded and the
        logits come back as a global array sharded (batch, -, vocab) by the rules."""
        t = self._check_tokens(tokens)
        if self.mesh is None:
            return _logits(self.graphdef, self.state, t)
        key = ("logits", *t.shape)
        if key not in self._sharded_fns:
            self._sharded_fns[key] = logits_jit(
                self.graphdef, self.state, self.mesh, self.rules, t.shape, self.config.vocab_size
            )
        fn, tok_sharding = self._sharded_fns[key]
        return fn(self.state, _place(t, tok_sharding))

    @functools.cached_property
    def _sharded_fns(self) -> dict:
        """Jitted sharded functions of this model (their shardings depend on the shapes)."""
        return {}

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

    def save(self, path: str | os.PathLike, *, dtype: str = "keep", overwrite: bool = False):
        """Writes a v4jax Orbax checkpoint (`v4jax.load` reads it back): release formats kept
        (`dtype="keep"`), or quantised weights stored dequantised (`dtype="bf16"`)."""
        convert.save_state(self.config, _leaves(self.state), path, dtype=dtype, overwrite=overwrite)

    def _check_tokens(self, tokens, what: str = "tokens") -> jax.Array:
        """Shape and dtype checks; the id range only for host arrays (ids already on the device
        are not read back: no device-to-host transfer per call)."""
        on_device = isinstance(tokens, jax.Array)
        t = tokens if on_device else np.asarray(tokens)
        if t.ndim != 2 or not jnp.issubdtype(t.dtype, jnp.integer):
            raise ValueError(f"{what}: expected an integer array [B, S], got {t.dtype}{t.shape}")
        if t.shape[1] == 0:
            raise ValueError(f"{what}: empty sequence")
        if not on_device:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"{what}: ids must be in [0, {self.config.vocab_size}), found [{lo}, {hi}]"
                )
        return jnp.asarray(t, jnp.int32)


@numerics_jit(static_argnums=0)
def _logits(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def logits_jit(graphdef, state, mesh, rules, tokens_shape: tuple[int, int], vocab: int):
    """The forward jitted on `mesh` with explicit in / out shardings: parameters as `rules`
    place them, tokens [B, S] and logits [B, S, V] as its activation rules split them.

    Returns (jitted fn(state, tokens), token sharding). `state` may be abstract (AOT lowering
    in scripts/plan.py). The rules context is entered at trace time, so the hooks in the model
    (activation constraints, expert-parallel MoE) see this mesh and no other.
    """
    mesh, rules = sharding.auto(mesh), sharding.rules_for(rules)
    act = rules.activations

    def named(axes, shape):
        return NamedSharding(mesh, sharding.resolve(axes, shape, dict(mesh.shape), act))

    tok = named(("batch", "length"), tuple(tokens_shape))
    out = named(("batch", "length", "vocab"), (*tokens_shape, vocab))

    def forward(state, tokens):
        with sharding.use_rules(mesh, rules):
            return nnx.merge(graphdef, state)(tokens)

    params = sharding.state_shardings(state, mesh, rules)
    return numerics_jit(forward, in_shardings=(params, tok), out_shardings=out), tok


def _place(a, where: NamedSharding) -> jax.Array:
    """A host array (the same on every process) -> a global array with sharding `where`; each
    process copies only the shards of its own devices. A jax.Array already there is kept."""
    if isinstance(a, jax.Array):
        if a.sharding == where:
            return a
        if not a.is_fully_addressable:
            return jax.device_put(a, where)
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, where, lambda idx: host[idx])


@numerics_jit(static_argnums=0)
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


def _build(cfg, prec, kernels, source, progress: bool, mesh=None, rules=None) -> Model:
    graphdef, abstract = _abstract(cfg, prec, kernels)
    if mesh is not None:  # fail on a bad mesh / rules before reading any weights
        mesh, rules = sharding.auto(mesh), sharding.rules_for(rules or sharding.DECODE)
        specs = sharding.param_specs(abstract, mesh, rules)
    arrays = load_release_arrays(source, cfg, _leaves(abstract), progress=progress)
    if mesh is None:
        place = lambda p: jnp.asarray(arrays.pop(p))
    else:  # each parameter straight onto its shards: never the whole tree on one device
        place = lambda p: _place(arrays.pop(p), NamedSharding(mesh, specs[p]))
    flat = [(p, v.replace(place(tuple(p)))) for p, v in nnx.to_flat_state(abstract)]
    return Model(cfg, prec, graphdef, nnx.from_flat_state(flat), kernels, mesh, rules)


def load(
    path: str | os.PathLike,
    *,
    numerics: str = "reference",
    dtype=None,
    mesh=None,
    rules=None,
    kernels: str = "auto",
    progress: bool = True,
) -> Model:
    """Loads an official release folder (config.json + safetensors shards) or a v4jax Orbax
    checkpoint (`Model.save`, `scripts/convert.py hf-to-orbax`), detected by its contents.

    `mesh`: a `jax.make_mesh` / `sharding.make_mesh` mesh with axes from `sharding.AXES`; each
    parameter is placed with the NamedSharding its logical axes get under `rules`
    (`sharding.DECODE` by default, or `sharding.TRAIN`, or "decode" / "train")."""
    path = os.fspath(path)
    prec = _precision(numerics, dtype)
    kind = orbax_io.require(path, orbax_io.Kind.RELEASE, orbax_io.Kind.ORBAX)
    if kind is orbax_io.Kind.ORBAX:
        return _build_orbax(path, prec, kernels, mesh, rules)
    return _build(from_json(path), prec, kernels, path, progress, mesh, rules)


def _build_orbax(path: str, prec, kernels, mesh=None, rules=None) -> Model:
    """A v4jax Orbax checkpoint (`Model.save`, `scripts/convert.py hf-to-orbax`) -> Model;
    with a mesh, Orbax places each parameter directly with its sharding."""
    cfg = orbax_io.read_marker(path).config
    graphdef, abstract = _abstract(cfg, prec, kernels)
    shardings = None
    if mesh is not None:
        mesh, rules = sharding.auto(mesh), sharding.rules_for(rules or sharding.DECODE)
        specs = sharding.param_specs(abstract, mesh, rules)
        shardings = {p: NamedSharding(mesh, spec) for p, spec in specs.items()}
    arrays = convert.restore_state(path, _leaves(abstract), shardings=shardings)
    flat = [(p, v.replace(arrays.pop(tuple(p)))) for p, v in nnx.to_flat_state(abstract)]
    return Model(cfg, prec, graphdef, nnx.from_flat_state(flat), kernels, mesh, rules)


def export_hf(model: Model, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes `model` in the official release format (tensor names, dtypes, shapes,
    config.json, index, shards), streaming tensor by tensor."""
    convert.export_state(model.config, _leaves(model.state), path, overwrite=overwrite)


def init(
    cfg: ModelConfig,
    *,
    seed: int = 0,
    numerics: str = "reference",
    dtype=None,
    mesh=None,
    rules=None,
    kernels: str = "auto",
) -> Model:
    """Random weights in the release layout (FP8 / FP4 + E8M0, as `v4jax.checkpoint.synthetic`);
    `mesh` / `rules` as in `load`."""
    tensors: Mapping[str, np.ndarray] = random_release_tensors(cfg, seed)
    return _build(cfg, _precision(numerics, dtype), kernels, tensors, False, mesh, rules)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from abstract shapes (no allocation).

    `total`: main stack + embedding + head (the advertised 284B / 1.6T exclude the MTP block,
    reported as `mtp`). `active`: parameters used per token, i.e. total minus the unused routed
    experts and minus the embedding table (a lookup): 13.3B / 48.9B, the advertised 13B / 49B.
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
