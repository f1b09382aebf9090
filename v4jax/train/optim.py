"""The V4 optimizer: Muon (hybrid 8+2 Newton-Schulz) for matrices, AdamW for the rest.

V4 report §2.4 (Algorithm 1) and §4.2.2; `optax.contrib.muon` (optax 0.2.8) for contrast.

Per step: clip all gradients by global norm (1.0, V3's value; §4.2.2: V4 "follows V3"), then
- Muon on every matrix (§2.4): M_t = mu M_{t-1} + G_t (plain sum, mu 0.95); Nesterov input
  mu M_t + G_t; divide by its Frobenius norm; 10 Newton-Schulz steps X <- aX + b(XX^T)X +
  c(XX^T)^2 X, 8 with (3.4445, -4.7750, 2.0315) then 2 with (2, -1.5, 0.5); times
  0.18 sqrt(max(O, I)) so every update matrix has RMS 0.18, the AdamW scale (§2.4).
- AdamW on embedding, head, RMSNorm weights, mHC static biases S and gating factors alpha, and
  the few non-matrix parameters (§2.4, §4.2.2): b1 0.9, b2 0.95, eps 1e-20, no Nesterov.
- Decoupled weight decay W <- W (1 - lr wd), wd 0.1, for both groups, then -lr x update.

Why our own Muon transform rather than `optax.contrib.muon`: its momentum is a
bias-corrected EMA (V4's is a plain sum; equal only up to the first steps' correction factors),
its Adam branch shares eps/Nesterov with Muon, the V4 rescale exists only as a private helper,
and stacked tensors go to Adam unless a dimension-number tree is given. Here Muon always acts on
the LAST TWO axes [O, I] of a leaf (weights are stored [O, I], y = x W^T) and every leading axis
(stacked layers L, routed experts E) is a batch axis: each layer and each expert is orthogonalised
on its own (§3.5.1 "optimize each expert independently").

State is optax NamedTuples of arrays (and optax.partition's empty `MaskedNode`s): `jax.eval_shape`
gives its shapes, jit shards it like the parameters, Orbax saves and restores it given a target.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharding import constraints

# (a, b, c) per Newton-Schulz step: 8 fast steps, then 2 that converge to 1 (§2.4).
V4_NS_COEFFS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),) * 8 + (
    (2.0, -1.5, 0.5),
) * 2

MUON, ADAMW = "muon", "adamw"


class Kind(enum.StrEnum):
    """Which optimizer family: V4's Muon + AdamW split, or AdamW for everything (baseline)."""

    MUON = "muon"
    ADAMW = "adamw"


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Every number of the V4 optimizer; defaults are the report's (§2.4, §4.2.2).

    - `clip_norm`: global-norm gradient clipping before both groups (None: off).
    - `muon_momentum`, `muon_nesterov`: momentum mu and the Nesterov input mu M_t + G_t.
    - `muon_ns_coeffs`: one (a, b, c) row per Newton-Schulz step (10 rows: 8 + 2).
    - `muon_rms`: target RMS of each orthogonalised update matrix (gamma = 0.18).
    - `muon_eps`: added to the Frobenius norm before dividing (all-zero gradients stay zero).
    - `muon_weight_decay`, `adam_weight_decay`: decoupled decay lambda, multiplied by the LR.
    - `adam_b1`, `adam_b2`, `adam_eps`, `adam_nesterov`: AdamW moments.
    - `mu_dtype`: dtype of the Muon momentum and Adam first moment (None: the gradient's).
    - `ns_dtype`: dtype of the Newton-Schulz matmuls (None: the gradient's; V4 uses bfloat16,
      §3.5.1); the Frobenius normalisation is always float32.
    - `muon_layout`: where Newton-Schulz runs on a mesh (`sharding.constraints.per_matrix`):
      "owner" (hybrid ZeRO, §3.5.1: each device orthogonalises the whole matrices and experts
      it is assigned), "replicated" (every device every matrix: the naive gather-all) or
      "sharded" (GSPMD matmuls on the ZeRO shards). Same values; different collectives.
    """

    clip_norm: float | None = 1.0
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_coeffs: tuple[tuple[float, float, float], ...] = V4_NS_COEFFS
    muon_rms: float = 0.18
    muon_eps: float = 1e-7
    muon_weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-20
    adam_nesterov: bool = False
    adam_weight_decay: float = 0.1
    mu_dtype: Any = None
    ns_dtype: Any = None
    muon_layout: str = "owner"

    def __post_init__(self):
        if self.muon_layout not in ("owner", "replicated", "sharded"):
            raise ValueError(
                "OptimConfig: muon_layout must be 'owner', 'replicated' or 'sharded', "
                f"got {self.muon_layout!r}"
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"OptimConfig: clip_norm must be > 0 or None, got {self.clip_norm}")
        for name in ("muon_momentum", "adam_b1", "adam_b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(
                    f"OptimConfig: {name} must be in [0, 1), got {getattr(self, name)}"
                )
        for name in ("muon_eps", "adam_eps", "muon_weight_decay", "adam_weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"OptimConfig: {name} must be >= 0, got {getattr(self, name)}")
        if not self.muon_rms > 0:
            raise ValueError(f"OptimConfig: muon_rms must be > 0, got {self.muon_rms}")
        rows = self.muon_ns_coeffs
        if not rows or any(len(r) != 3 for r in rows):
            raise ValueError(f"OptimConfig: muon_ns_coeffs must be (a, b, c) rows, got {rows}")


# --------------------------------------------------------------------------- Newton-Schulz


def newton_schulz(x: jax.Array, coeffs=V4_NS_COEFFS, *, eps: float = 1e-7, dtype=None):
    """x [..., O, I] -> the orthogonalised [O, I] of each trailing matrix (§2.4), x's dtype.

    One step per (a, b, c) row of `coeffs` on X / ||X||_F. A tall matrix is transposed first so
    the Gram matrix X X^T is the small [min, min] one; the iteration commutes with transposition.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz: needs a matrix [..., O, I], got shape {x.shape}")
    out_dtype = x.dtype
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)  # [..., min(O, I), max(O, I)]
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=(-2, -1), keepdims=True))  # [..., 1, 1]
    x = (x32 / (norm + eps)).astype(dtype or out_dtype)
    for a, b, c in coeffs:
        gram = x @ jnp.swapaxes(x, -1, -2)  # [..., min, min]
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(out_dtype)


class MuonState(NamedTuple):
    """Muon momentum M_t, one array per Muon leaf (plain sum of past gradients, §2.4)."""

    mu: Any


def scale_by_muon(
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    coeffs=V4_NS_COEFFS,
    rms: float = 0.18,
    eps: float = 1e-7,
    mu_dtype=None,
    ns_dtype=None,
    layout: str = "owner",
) -> optax.GradientTransformation:
    """V4 Algorithm 1 steps 2-4 on the last two axes of every leaf (rank >= 2 required).

    Returns the orthogonalised direction O_t = NS(mu M_t + G_t) * rms * sqrt(max(O, I)); weight
    decay and -lr are applied by later transforms. `layout`: see `OptimConfig.muon_layout`
    (only acts when traced under a mesh's rules).
    """

    def init(params):
        return MuonState(mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params))

    def direction(path, g, m):
        if g.ndim < 2:
            raise ValueError(f"scale_by_muon: leaf of shape {g.shape} is not a matrix [..., O, I]")
        x = momentum * m + g if nesterov else m  # m is already M_t
        scale = rms * math.sqrt(max(g.shape[-2], g.shape[-1]))
        stored = constraints.stored_spec(path_names(path))  # where the leaf lives, if declared
        ns = functools.partial(newton_schulz, coeffs=coeffs, eps=eps, dtype=ns_dtype)
        return scale * constraints.per_matrix(ns, x, layout, stored)  # whole matrices per device

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: momentum * m.astype(g.dtype) + g, updates, state.mu)
        updates = jax.tree_util.tree_map_with_path(direction, updates, mu)
        mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
        return updates, MuonState(mu=mu)

    return optax.GradientTransformation(init, update)


def add_decoupled_weight_decay(rates) -> optax.GradientTransformation:
    """updates + rate * params, `rates` a tree of Python floats shaped like the params.

    Placed before the LR scaling, so the step is W <- W (1 - lr rate) - lr u (decoupled decay
    multiplied by the LR, §2.4 Algorithm 1). Leaves with rate 0 are untouched.
    """

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs params: call update(grads, state, params)")
        out = jax.tree.map(lambda u, p, r: u if r == 0 else u + r * p, updates, params, rates)
        return out, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


# --------------------------------------------------------------------------- parameter groups


def path_names(path) -> tuple[str, ...]:
    """A pytree key path -> its names as strings (dict keys, attribute names, list indices)."""
    keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return tuple(str(k) for k in keys)


def _group(names: tuple[str, ...], ndim: int) -> tuple[str, bool]:
    """(optimizer label, weight decay?) of one trainable parameter, from its path (§4.2.2)."""
    leaf, parent = names[-1], (names[-2] if len(names) > 1 else "")
    where = "/".join(names)
    if names[0] == "embed" or (parent == "head" and leaf == "weight"):
        # Embedding and prediction head: AdamW (§4.2.2). Real [V, D] matrices, so decayed like
        # every other weight matrix (§4.2.2 gives AdamW wd 0.1 without a mask; we exclude only
        # gains and biases, the usual practice).
        return ADAMW, True
    if leaf == "weight" and parent.endswith("norm"):
        # RMSNorm gains (attn/ffn/q/kv/compressor/MTP e/h norms): AdamW (§4.2.2); no decay, which
        # would pull every gain towards 0 rather than towards the identity (1).
        return ADAMW, False
    if parent.startswith("hc") and leaf in ("base", "scale"):
        # mHC static biases S and gating factors alpha (hc_attn, hc_ffn, hc_head): AdamW (§2.4);
        # biases and gains, so no decay.
        return ADAMW, False
    if leaf in ("lora_a", "lora_b"):
        # LoRA adapters (train/lora.py): AdamW without decay, the usual LoRA recipe (the
        # low-rank factors are not whole matrices whose orthogonalisation would mean anything).
        return ADAMW, False
    if leaf in ("attn_sink", "ape", "bias"):
        # Not linear maps: attention-sink logits [L, H], the compressor's learned position
        # biases added to its pooling logits (`ape` [L, ratio, W]), any bias. Orthogonalising an
        # additive bias table is meaningless, so AdamW, and no decay (they are biases).
        return ADAMW, False
    if leaf in ("weight", "fn", "w1", "w2", "w3"):
        # Linear maps [..., O, I]: attention, compressor and indexer projections, mHC W^pre/res/
        # post (`fn`), router gate, shared and routed experts -> Muon (§2.4), decayed.
        if ndim < 2:
            raise ValueError(f"partition: {where} is a linear map but has rank {ndim} < 2")
        return MUON, True
    raise ValueError(f"partition: no optimizer rule for parameter {where} (see optim._group)")


def spec_table(shardings) -> dict[tuple[str, ...], Any]:
    """A params-shaped tree of NamedShardings -> {path of names: PartitionSpec}: where each
    parameter lives, for `sharding.constraints.stored_specs` (Muon's owner layout)."""
    flat = jax.tree_util.tree_leaves_with_path(shardings)
    return {path_names(path): s.spec for path, s in flat if hasattr(s, "spec")}


def partition(params) -> Any:
    """Trainable-parameter tree -> same tree of "muon" | "adamw" labels (§2.4, §4.2.2), by name."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: _group(path_names(path), jnp.ndim(p))[0], params
    )


def weight_decay_mask(params) -> Any:
    """Trainable-parameter tree -> same tree of bools: True where decoupled decay applies."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: _group(path_names(path), jnp.ndim(p))[1], params
    )


# --------------------------------------------------------------------------- the optimizer


def make_optimizer(
    params,
    *,
    schedule: optax.ScalarOrSchedule,
    kind: Kind | str = Kind.MUON,
    config: OptimConfig | None = None,
) -> optax.GradientTransformation:
    """The V4 optimizer for `params` (arrays or `jax.ShapeDtypeStruct`s; only names and ranks
    are read): clip -> {Muon | AdamW} by `partition` -> decoupled decay -> -schedule(step).

    `kind="adamw"` puts every parameter in the AdamW group (a baseline), same decay mask.
    `update` needs `params` (for weight decay).
    """
    cfg = config or OptimConfig()
    try:
        kind = Kind(kind)
    except ValueError:
        raise ValueError(f"make_optimizer: kind must be 'muon' or 'adamw', got {kind!r}") from None
    if not (callable(schedule) or isinstance(schedule, int | float)):
        raise ValueError(f"make_optimizer: schedule must be a number or callable, got {schedule!r}")
    labels = partition(params)
    if kind is Kind.ADAMW:
        labels = jax.tree.map(lambda _: ADAMW, labels)
    wd = {MUON: cfg.muon_weight_decay, ADAMW: cfg.adam_weight_decay}
    rates = jax.tree.map(lambda lab, d: wd[lab] if d else 0.0, labels, weight_decay_mask(params))
    groups = {
        MUON: scale_by_muon(
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            coeffs=cfg.muon_ns_coeffs,
            rms=cfg.muon_rms,
            eps=cfg.muon_eps,
            mu_dtype=cfg.mu_dtype,
            ns_dtype=cfg.ns_dtype,
            layout=cfg.muon_layout,
        ),
        ADAMW: optax.scale_by_adam(
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            eps=cfg.adam_eps,
            mu_dtype=cfg.mu_dtype,
            nesterov=cfg.adam_nesterov,
        ),
    }
    used = set(jax.tree.leaves(labels))
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity()
    return optax.chain(
        clip,
        optax.partition({k: t for k, t in groups.items() if k in used}, labels),
        add_decoupled_weight_decay(rates),
        optax.scale_by_learning_rate(schedule),
    )
