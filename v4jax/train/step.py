"""The train state and the jit-compiled train step.

`TrainState` is one pytree: float32 master `params`, the optimizer state, the `frozen` leaves
(router biases, which the aux-loss-free rule updates outside the optimizer, `tid2eid`), the
step count and an RNG key (raw uint32 data, so Orbax saves it like any array). The data
iterator's position is host state and is checkpointed beside it (`checkpoint.py`).

One step (`make_step`): the batch [A, B, S] is A micro-batches (gradient accumulation, a
`lax.scan`); per micro-batch `losses.value_and_grad` gives the loss, its parts and float32
gradients; the gradients are averaged over the micro-batches (each weighted by its number of
target tokens, so A micro-batches of B rows equal one batch of A x B rows exactly when every
micro-batch has the same number of targets, as packed rows do); then the optimizer update, the
aux-loss-free router-bias update from the step's expert loads (b_i += rate * sign(mean load -
load_i), non-hash layers and MTP), and step + 1. A step whose loss or gradient norm is not
finite changes nothing (params, optimizer state and biases stay as they were) and reports it in
`metrics["finite"]`, so the caller can stop with the last good state intact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sharding import constraints
from v4jax.model import remat as remat_policy
from v4jax.numerics.policy import jit
from v4jax.train import losses
from v4jax.train.model import TrainModel
from v4jax.train.optim import spec_table

__all__ = ["LossWeights", "TrainState", "init_state", "make_step"]

F32 = jnp.float32


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "opt_state", "frozen", "step", "rng"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Any  # nested dict of float32 master weights (TrainModel.params)
    opt_state: Any  # optax state
    frozen: Any  # nested dict: router biases, tid2eid, ... (TrainModel.frozen)
    step: jax.Array  # int32 []: optimizer steps taken
    rng: jax.Array  # uint32 [2]: raw key data, folded with the step when randomness is needed


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossWeights:
    """Loss weights and the router-bias speed (V4 defaults, V4 report §4.2.2).

    `mtp=None` follows the schedule: 0.3, then 0.1 from the start of learning-rate decay."""

    mtp: float | None = None
    balance: float = 1e-4
    indexer: float = 0.0
    bias_rate: float = 1e-3


def init_state(
    tm: TrainModel, optimizer: optax.GradientTransformation, *, seed: int = 0, copy: bool = True
):
    """The state at step 0 of a run that starts from `tm`.

    The step donates its state, so by default the state holds copies of `tm`'s arrays and `tm`
    stays usable. `copy=False` hands `tm`'s own buffers to the state (no second copy of the
    weights in memory); the first step then deletes them and `tm` must not be used again."""
    rng = jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
    params, frozen = tm.params, tm.frozen
    if copy:
        params, frozen = jax.tree.map(jnp.copy, (params, frozen))
    return TrainState(params, optimizer.init(params), frozen, jnp.zeros((), jnp.int32), rng)


def make_step(
    tm: TrainModel,
    optimizer,
    schedule,
    weights: LossWeights = LossWeights(),
    *,
    remat="none",
    shardings=None,
):
    """A jitted `step(state, tokens [A, B, S], mask [A, B, S]) -> (state, metrics)`.

    `tm` supplies the static parts (config, graph, numerics); its arrays are not used.
    Micro-batch i's terms are weighted by its share of the step's targets (LM: mask[:, 1:];
    MTP: `losses.mtp_mask`), its balance and indexer terms by 1 / A (they are means over
    sequences / queries), so the accumulated gradient is the gradient of the whole batch's
    objective. `remat`: the blocks' rematerialisation policy (`v4jax.model.remat`: "none",
    "block", "tensors", "save:NAME,...", "offload[:NAME,...]"), which trades memory for
    recomputation (or host transfers).

    On a mesh the new state keeps the state's shardings (gradients and moments as their
    parameters: ZeRO); each layer's weights are gathered for use inside the layer
    (`sharding.constraints.gathered`).
    `shardings` (a TrainState of NamedShardings) fixes them up front (ahead-of-time lowering);
    by default they are the first state's."""
    remat_policy.check(remat)
    skeleton = tm.replace(params=None, frozen=None)
    use_mtp = weights.mtp is None or weights.mtp != 0

    def objective(params, frozen, tokens, mask, scales):
        lm_s, mtp_s, rest_s, mtp_w = scales
        model = skeleton.replace(params=params, frozen=frozen)
        _, m = losses.loss(
            model,
            tokens,
            mask,
            mtp_weight=1.0 if use_mtp else 0.0,
            balance_weight=weights.balance,
            indexer_weight=weights.indexer,
            remat=remat,
        )
        total = lm_s * m["lm"] + mtp_s * mtp_w * m["mtp"]
        total = total + rest_s * (
            weights.balance * m["balance"] + weights.indexer * m["indexer_kl"]
        )
        return total, m

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    layout = {} if shardings is None else {"state": shardings}  # on a mesh: kept by every step

    def step(state: TrainState, tokens, mask):
        stored = spec_table(layout["state"].params) if layout else None  # for Muon's owner layout
        with tm.rules_context(), constraints.stored_specs(stored):
            new, out = _step(state, tokens, mask)
        if layout:
            new = jax.tree.map(jax.lax.with_sharding_constraint, new, layout["state"])
        return new, out

    def _step(state: TrainState, tokens, mask):
        mtp_w = schedule.mtp_weight(state.step) if weights.mtp is None else F32(weights.mtp)
        a = tokens.shape[0]
        n_lm = jnp.sum(mask[:, :, 1:] != 0, axis=(1, 2)).astype(F32)  # [A]
        n_mtp = jnp.sum(losses.mtp_mask(mask), axis=(1, 2))
        scales = (
            n_lm / jnp.maximum(jnp.sum(n_lm), 1.0),
            n_mtp / jnp.maximum(jnp.sum(n_mtp), 1.0),
            jnp.full((a,), 1.0 / a, F32),
        )

        def body(acc, xs):
            tok, msk, lm_s, mtp_s, rest_s = xs
            (total, m), g = grad_fn(
                state.params, state.frozen, tok, msk, (lm_s, mtp_s, rest_s, mtp_w)
            )
            parts = {k: m[k] for k in ("lm", "mtp", "balance", "indexer_kl")}
            w = {"lm": lm_s, "mtp": mtp_s, "balance": rest_s, "indexer_kl": rest_s}
            parts = {k: v * w[k] for k, v in parts.items()}
            new = (
                acc[0] + total,
                jax.tree.map(jnp.add, acc[1], g),
                jax.tree.map(jnp.add, acc[2], parts),
                jax.tree.map(jnp.add, acc[3], m["expert_counts"]),
                acc[4] + m["moe_dropped"],
            )
            return new, None

        shapes = jax.eval_shape(
            grad_fn, state.params, state.frozen, tokens[0], mask[0], (F32(1), F32(1), F32(1), mtp_w)
        )
        (_, m0), g0 = shapes
        zero = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), t)
        parts0 = {k: jnp.zeros((), F32) for k in ("lm", "mtp", "balance", "indexer_kl")}
        init = (jnp.zeros((), F32), zero(g0), parts0, zero(m0["expert_counts"]), F32(0))
        (loss, grads, parts, counts, dropped), _ = jax.lax.scan(body, init, (tokens, mask, *scales))
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        frozen = losses.update_router_bias(state.frozen, counts, rate=weights.bias_rate)
        new = TrainState(params, opt_state, frozen, state.step + 1, state.rng)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        out = dict(
            loss=loss,
            ce=parts["lm"],
            mtp=parts["mtp"],
            balance=parts["balance"],
            indexer_kl=parts["indexer_kl"],
            grad_norm=gnorm,
            lr=schedule(state.step),
            mtp_weight=mtp_w,
            finite=finite,
            moe_dropped=dropped,
            **load_stats(counts),
        )
        return new, out

    jitted = jit(step, donate_argnums=0)
    if tm.mesh is None:
        return jitted

    def on_mesh(state: TrainState, tokens, mask):
        """Host batches [A, B, S] are split over the data axes along B; the state keeps the
        shardings it arrives with (the params' from the rules, the optimizer's alike; leaves
        on one device, such as the step counter, are replicated over the mesh)."""
        state = jax.tree.map(_on(tm.mesh), state)
        if not layout:
            layout["state"] = jax.tree.map(lambda x: x.sharding, state)
        return jitted(state, tm.place_batch(tokens, 1), tm.place_batch(mask, 1))

    return on_mesh


def _on(mesh):
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return place


def load_stats(counts) -> dict:
    """max / mean expert load over the routed (non-hash) layers' token counts."""
    leaves = [c.reshape(-1, c.shape[-1]) for c in jax.tree.leaves(counts)]
    if not leaves:
        return {}
    c = jnp.concatenate(leaves).astype(jnp.float32)  # [layers, E]
    ratio = jnp.max(c, axis=-1) / jnp.maximum(jnp.mean(c, axis=-1), 1e-9)
    return {"load_max_over_mean": jnp.mean(ratio)}
