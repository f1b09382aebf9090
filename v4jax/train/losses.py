"""The V4 training objective (V4 report §2.1, §4.2.2) and its gradient.

    loss = LM + mtp_weight * MTP + balance_weight * balance + indexer_weight * indexer KL

- LM: mean next-token cross-entropy over the target tokens (`mask[:, t]` marks token t as a
  target of position t - 1; `mask[:, 0]` is ignored).
- MTP (V3 report §2.2): the MTP block reads the main model's final streams at i (computed once,
  shared with the LM term) and the embedding of token i + 1, and predicts token i + 2 (a target
  when tokens i + 1 and i + 2 both are: `mtp_mask`).
- balance (V3 report §2.1.2): sum over the non-hash MoE layers and the MTP block of the
  sequence-wise term sum_i f_i P_i (`Router.stats`); alpha = `balance_weight` (1e-4 in V4).
- indexer KL (V3.2 report §2.1.1): KL(p || softmax(index scores)) per query of the CSA layers,
  averaged over queries and layers, in the "dense" warm-up stage (attention over every visible
  entry, only the indexer trained) or the "sparse" stage (KL over the picked top-k; the
  indexer reads detached inputs, so it learns from the KL only and the rest of the model from
  the LM only).

The default `indexer_weight` is 0: no KL pass, the indexer gets no gradient (its top-k is
discrete) and stays as released, which is what fine-tuning a released model wants; the KL pass
costs another score of every picked entry. When on, 1.0 is as good as any value: in both stages
the KL is the indexer's only gradient and reaches nothing else, so its weight only rescales the
indexer's gradient, which Muon (normalised updates) and Adam ignore.

The aux-loss-free router bias is not a gradient: `update_router_bias` applies
b_i += rate * sign(mean load - load_i) from the per-layer expert counts in the metrics.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp

from v4jax.model import remat as remat_policy
from v4jax.numerics.policy import jit as numerics_jit
from v4jax.train.model import TrainModel, _flatten, _join, _unflatten

__all__ = [
    "IndexerStage",
    "cross_entropy",
    "indexer_mask",
    "loss",
    "mtp_mask",
    "update_router_bias",
    "value_and_grad",
]

F32 = jnp.float32


class IndexerStage(enum.Enum):
    """How the lightning indexer is trained (V3.2 report §2.1.1); for `indexer_weight` > 0."""

    DENSE = "dense"  # warm-up: dense attention, only the indexer trained (on the KL)
    SPARSE = "sparse"  # top-k attention, KL over the picked entries, indexer inputs detached

    @classmethod
    def parse(cls, value: str | IndexerStage) -> IndexerStage:
        if isinstance(value, IndexerStage):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"indexer_stage={value!r}: expected one of {choices}") from None


def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, weight: jnp.ndarray):
    """logits [B, T, V], targets [B, T] int, weight [B, T] -> (sum of weighted CE, sum of
    weights), float32 (float64 for float64 logits)."""
    dt = jnp.promote_types(logits.dtype, F32)
    logp = jax.nn.log_softmax(logits.astype(dt), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    w = weight.astype(dt)
    return jnp.sum(nll * w), jnp.sum(w)


def _ahead(a: jnp.ndarray, k: int, fill) -> jnp.ndarray:
    """[B, S] -> [B, S]: position i holds a[:, i + k], the last k positions `fill`."""
    return jnp.pad(a[:, k:], ((0, 0), (0, k)), constant_values=fill)


def mtp_mask(mask: jnp.ndarray) -> jnp.ndarray:
    """Target mask [..., S] -> the MTP's [..., S - 2]: token i + 2 (predicted at i from token
    i + 1) counts when tokens i + 1 and i + 2 are both targets, so an MTP target never reaches
    across a document boundary (a document's first token is not a target)."""
    m = jnp.asarray(mask)
    return ((m[..., 1:-1] != 0) & (m[..., 2:] != 0)).astype(F32)


def loss(
    model: TrainModel,
    tokens: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    *,
    mtp_weight: float = 0.3,
    balance_weight: float = 1e-4,
    indexer_weight: float = 0.0,
    indexer_stage: str | IndexerStage = "sparse",
    remat: str = "none",
) -> tuple[jnp.ndarray, dict]:
    """The training objective of tokens [B, S] (int) with target mask [B, S] -> (loss,
    metrics). Traceable (call it inside your own jit / grad); `value_and_grad` wraps it. The
    weights are Python numbers: mtp_weight 0 skips the MTP block, indexer_weight 0 the KL pass
    (the router statistics are always computed: one [T, E] product per layer). `remat`: the
    blocks' rematerialisation policy ("none", "block", "tensors", "save:NAME,...";
    `v4jax.model.remat`): same values, less memory, more compute.

    metrics: "loss", "lm", "mtp", "balance", "indexer_kl" (each term unweighted),
    "targets" (LM target tokens), "expert_counts" {block key: tokens per expert [..., E]}
    (block keys "segments.{s}.blocks.{j}" with a leading [repeats] axis, and "mtp.block"),
    "moe_dropped" (routed assignments dropped by a bounded expert-parallel buffer,
    `TrainModel.moe_buffer`; 0 when dropless)."""
    tokens, mask = _check(model, tokens, mask)
    stage = IndexerStage.parse(indexer_stage).value if indexer_weight else "off"
    with model.rules_context():
        return _loss(model, tokens, mask, stage, remat, mtp_weight, balance_weight, indexer_weight)


def _loss(model, tokens, mask, stage, remat, mtp_weight, balance_weight, indexer_weight):
    module = model.module()
    logits, streams, stats = module.forward_train(tokens, stage, remat)
    # Every array keeps the sequence's S positions (targets shifted in, the tail weighted 0),
    # so a sequence split over context shards stays split (S - 1 would not divide).
    lm_sum, n = cross_entropy(logits, _ahead(tokens, 1, 0), _ahead(mask, 1, 0))
    lm = lm_sum / jnp.maximum(n, 1.0)
    mtp = jnp.zeros((), F32)
    if mtp_weight and module.mtp is not None and tokens.shape[1] > 2:
        # position S - 1 has no next token: fed token 0, left out of the loss and statistics
        m_logits, stats["mtp.block"] = module.mtp_forward_train(
            streams, _ahead(tokens, 1, 0), stage, remat, tail=1
        )
        weight = jnp.pad(mtp_mask(mask), ((0, 0), (0, 2)))
        m_sum, m_n = cross_entropy(m_logits, _ahead(tokens, 2, 0), weight)
        mtp = m_sum / jnp.maximum(m_n, 1.0)
    balance = sum(jnp.sum(a["balance"]) for a in stats.values())
    kl_n = sum(jnp.sum(a["kl_queries"]) for a in stats.values())
    kl = sum(jnp.sum(a["kl"]) for a in stats.values()) / jnp.maximum(kl_n, 1.0)
    total = lm + mtp_weight * mtp + balance_weight * balance + indexer_weight * kl
    metrics = {
        "loss": total,
        "lm": lm,
        "mtp": mtp,
        "balance": balance,
        "indexer_kl": kl,
        "targets": n,
        "expert_counts": {k: a["counts"] for k, a in stats.items()},
        "moe_dropped": sum(jnp.sum(a["moe_dropped"]) for a in stats.values()),
    }
    return total, metrics


def value_and_grad(
    model: TrainModel,
    tokens,
    mask=None,
    *,
    mtp_weight: float = 0.3,
    balance_weight: float = 1e-4,
    indexer_weight: float = 0.0,
    indexer_stage: str | IndexerStage = "sparse",
    remat: str = "none",
) -> tuple[jax.Array, dict, dict]:
    """(loss, metrics, grads): `loss` and its float32 gradient with respect to
    `model.params` (same nested dict). Jitted; the weights and the stage are static.

    Dense indexer stage: the loss is indexer_weight * KL, the gradient is the indexer's
    (every leaf under an `indexer` module) and zero elsewhere; the LM / MTP / balance terms
    are still reported in the metrics. Freeze the other parameters in the optimizer too
    (weight decay), e.g. with `indexer_mask(model.params)`."""
    stage = IndexerStage.parse(indexer_stage)
    if stage is IndexerStage.DENSE and not indexer_weight:
        raise ValueError("the dense indexer stage trains only the indexer: indexer_weight > 0")
    remat_policy.check(remat)
    tokens, mask = _check(model, tokens, mask)
    opts = (float(mtp_weight), float(balance_weight), float(indexer_weight), stage.value, remat)
    return _value_and_grad(model, tokens, mask, opts)


@functools.partial(numerics_jit, static_argnums=3)
def _value_and_grad(model: TrainModel, tokens, mask, opts):
    mtp_w, bal_w, idx_w, stage, remat = opts
    kw = dict(
        mtp_weight=mtp_w,
        balance_weight=bal_w,
        indexer_weight=idx_w,
        indexer_stage=stage,
        remat=remat,
    )
    if stage != IndexerStage.DENSE.value:
        fn = lambda p: loss(model.replace(params=p), tokens, mask, **kw)
        (total, metrics), grads = jax.value_and_grad(fn, has_aux=True)(model.params)
        return total, metrics, grads
    flat = _flatten(model.params)
    own = _unflatten({p: a for p, a in flat.items() if "indexer" in p})
    rest = _unflatten({p: a for p, a in flat.items() if "indexer" not in p})

    def fn(own):
        _, metrics = loss(model.replace(params=_join(own, rest)), tokens, mask, **kw)
        return idx_w * metrics["indexer_kl"], metrics

    (total, metrics), g = jax.value_and_grad(fn, has_aux=True)(own)
    g = _flatten(g)
    grads = _unflatten({p: g[p] if p in g else jnp.zeros_like(a) for p, a in flat.items()})
    return total, metrics, grads


def indexer_mask(params: dict) -> dict:
    """A tree like `params`: True on the lightning indexers' leaves (the dense stage's only
    trained parameters), False elsewhere."""
    return _map_with_path(lambda path, _: "indexer" in path, params)


def update_router_bias(frozen: dict, counts: dict, rate: float = 1e-3) -> dict:
    """Aux-loss-free balancing (V3 report §2.1.2): every router with a bias (non-hash layers,
    MTP) gets b_i += rate * sign(mean_j load_j - load_i) from `counts`
    (`metrics["expert_counts"]`, summed over the step's batches). Hash-routed layers have no
    bias and are untouched. Returns the new `frozen` tree."""
    out = _map_with_path(lambda path, a: a, frozen)
    for key, load in counts.items():
        node = out
        for part in key.split("."):
            node = node[int(part) if part.isdigit() else part]
        gate = node["ffn"]["gate"]
        if "bias" not in gate:
            continue
        load = jnp.asarray(load, F32)
        step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        gate["bias"] = gate["bias"] + F32(rate) * step
    return out


def _map_with_path(fn, tree: dict, path: tuple = ()) -> dict:
    """A copy of a nested dict with each leaf replaced by fn(path, leaf)."""
    return {
        k: _map_with_path(fn, v, (*path, k)) if isinstance(v, dict) else fn((*path, k), v)
        for k, v in tree.items()
    }


def _check(model: TrainModel, tokens, mask):
    t = jnp.asarray(tokens)
    if t.ndim != 2 or not jnp.issubdtype(t.dtype, jnp.integer) or t.shape[1] < 2:
        raise ValueError(f"tokens: expected an integer array [B, S >= 2], got {t.dtype}{t.shape}")
    if mask is None:
        m = jnp.ones(t.shape, F32)
    else:
        m = jnp.asarray(mask)
        if m.shape != t.shape:
            raise ValueError(f"mask {m.shape} and tokens {t.shape} differ in shape")
        m = m.astype(F32)
    shards = model.context_shards()
    if t.shape[1] % shards:
        raise ValueError(
            f"tokens: sequence length {t.shape[1]} is not divisible by the mesh's {shards} "
            "context shards"
        )
    if not isinstance(t, jax.core.Tracer):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= model.config.vocab_size:
            raise ValueError(
                f"tokens: ids must be in [0, {model.config.vocab_size}), found [{lo}, {hi}]"
            )
    return t.astype(jnp.int32), m
