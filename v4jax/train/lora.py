"""LoRA fine-tuning of a released V4 on its quantised base (LoRA: Hu et al. 2021,
arXiv 2106.09685).

Why: LoRA is the most requested way to fine-tune V4 (datawhalechina/self-llm PR #512: a
V4-Flash recipe adapts the attention's q_a / q_b / kv / o_b projections, r 16, alpha 32, and
serves the adapter on the FP4 + FP8 base), while full fine-tuning holds float32 masters,
gradients and moments for every parameter (V4 report §3.4) and a Flash base dequantised to
bf16 is ~500 GiB against ~160 in its release formats.

How: a target `Linear` [O, I] gets A [R, I] (uniform +-1/sqrt(I), seeded, as PEFT's kaiming
init) and B [O, R] (zero), and `Linear.__call__` computes y = base(x) + (alpha / R) (x A^T) B^T,
so the adapted model starts equal to the base. The adapters are extra `nnx.Param`s on the target
modules (with the segment's leading "layers" axis on scanned stacks, so `nnx.scan` slices them
per layer like every other leaf). The base stays in its release formats (FP8 / FP4 + E8M0, bf16),
dequantised next to each matmul as at inference, never copied. Training reuses `losses.py`
through a `TrainModel` view whose `params` are the adapters and whose `frozen` leaves are the
whole base, so gradients exist for the adapters only. The adapter product reads the linear's
input before the reference numerics' FP8 activation quantisation (LoRA serving kernels apply
adapters to the bf16 activation), activation-dtype operands, float32 accumulation.

Targets (`TARGETS`: release tensor names inside a block, in every layer and, with `mtp=True`,
in the MTP block): by default the attention's wq_a, wq_b, wkv, wo_b; also the shared expert, the
indexer (trained by the indexer KL only: its top-k passes no LM gradient) and the compressors.
Not `wo_a`: the grouped output projection is block-diagonal (G blocks [R_o, H K / G]) and runs
through `dequant` in `Attention.output`, not `Linear.__call__`; adapting it means G per-group
adapters in that einsum, and the V4 recipe adapts o_b instead. Not the routed experts (stacked
FP4 tensors run by `experts.py`, not `Linear`s).

Merging (`merge`): W' = W + (alpha / R) B A re-quantised with the release recipe
(`model.quantize`: FP8 e4m3 with recomputed 128 x 128 E8M0 block scales), so `export_hf` writes
it. Exact only where W' lies on the FP8 grid: each element rounds to the nearest e4m3 value of
its block (relative error up to 2^-4), so update components under half an FP8 step of the base
weight are lost: random updates of norm 1e-3 / 1e-2 / 1e-1 of ||W|| keep about 4% / 40% / 99%
of themselves (typical fine-tuning updates are small). `merge(quantize=False)` keeps float32
merged weights (exact forward in float32 numerics, not exportable); serving base + adapter
unmerged (`LoraModel.logits`, `serving_model`) loses nothing.

Optimizer: AdamW on the adapters (`make_optimizer`: optim.py's clip -> Adam -> decoupled decay
chain with the usual LoRA settings b2 0.999, eps 1e-8, no decay).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from v4jax.api import Model
from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.names import layer_slots
from v4jax.checkpoint.safetensors import SafetensorsFile, write_safetensors
from v4jax.config import ModelConfig, layer_plan, to_dict
from v4jax.model.layers import Linear
from v4jax.model.transformer import Transformer
from v4jax.numerics import Numerics, Precision
from v4jax.numerics.checksum import checksum
from v4jax.numerics.policy import jit as numerics_jit
from v4jax.train import losses, optim
from v4jax.train.model import _FORMATS, TrainModel, _flatten, _join, _unflatten, release_dequant
from v4jax.train.model import quantize as release_quantize

# fmt: off
__all__ = [
    "DEFAULT_TARGETS", "GROUPS", "LORA_ADAMW", "TARGETS", "LoraCount", "LoraModel", "LoraSpec",
    "attach", "count", "evaluate", "fingerprint", "load_adapters", "make_optimizer", "make_step",
    "merge", "resolve_targets", "save_adapters", "value_and_grad",
]
# fmt: on

F32 = jnp.float32
Path = tuple[str | int, ...]
TARGETS: dict[str, Path] = {  # name -> the Linear's path inside a Block
    "wq_a": ("attn", "wq_a"),
    "wq_b": ("attn", "wq_b"),
    "wkv": ("attn", "wkv"),
    "wo_b": ("attn", "wo_b"),
    "shared_w1": ("ffn", "shared_experts", "w1"),
    "shared_w2": ("ffn", "shared_experts", "w2"),
    "shared_w3": ("ffn", "shared_experts", "w3"),
    "indexer_wq_b": ("attn", "indexer", "wq_b"),
    "indexer_weights_proj": ("attn", "indexer", "weights_proj"),
    "compressor_wkv": ("attn", "compressor", "wkv"),
    "compressor_wgate": ("attn", "compressor", "wgate"),
}
GROUPS = {
    "attention": ("wq_a", "wq_b", "wkv", "wo_b"),
    "shared_experts": ("shared_w1", "shared_w2", "shared_w3"),
    "indexer": ("indexer_wq_b", "indexer_weights_proj"),
    "compressor": ("compressor_wkv", "compressor_wgate"),
}
DEFAULT_TARGETS = GROUPS["attention"]
_REFUSED = {
    "wo_a": "the grouped output projection runs through dequant in Attention.output, "
    "not Linear.__call__ (adapt wo_b)",
    "experts": "routed experts are stacked FP4 / FP8 tensors, not Linear modules",
}
LEAVES = ("lora_a", "lora_b")
FORMAT = "v4jax-lora-1"
# AdamW as LoRA recipes run it (HF / PEFT defaults): V4's b1, clip 1.0; b2 0.999, eps 1e-8, no
# decay (decaying B pulls the adapted model back towards the base, rarely wanted).
LORA_ADAMW = optim.OptimConfig(adam_b2=0.999, adam_eps=1e-8, adam_weight_decay=0.0)


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Target names and groups ("attention", "wq_a,wkv", ["indexer", "wo_b"]) -> the target
    names in `TARGETS` order."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    out: set[str] = set()
    for n in (n.strip() for n in names):
        if n in _REFUSED:
            raise ValueError(f"LoRA target {n!r} is not supported: {_REFUSED[n]}")
        if n not in TARGETS and n not in GROUPS:
            raise ValueError(f"LoRA target {n!r}: expected {sorted(TARGETS)} or {sorted(GROUPS)}")
        out.update(GROUPS.get(n, (n,)))
    if not out:
        raise ValueError("LoRA: no targets given")
    return tuple(t for t in TARGETS if t in out)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank R, alpha (the update is scaled by alpha / R), target names, MTP block adapted."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    mtp: bool = True

    def __post_init__(self):
        if not isinstance(self.rank, int | np.integer) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be finite and > 0, got {self.alpha!r}")
        object.__setattr__(self, "targets", resolve_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A frozen release-format base plus adapters (a pytree: `adapters` and `base` are data).

    `adapters`: nested dict {linear path: {"lora_a": [..., R, I], "lora_b": [..., O, R]}}
    float32; `base`: nested dict of the base model's leaves (release dtypes); `graphdef`: the
    base graph with the adapters attached; `base_graphdef`: the base graph alone."""

    adapters: dict
    base: dict
    spec: LoraSpec
    config: ModelConfig
    precision: Precision
    graphdef: nnx.GraphDef
    base_graphdef: nnx.GraphDef
    kernels: str = "auto"

    def module(self) -> Transformer:
        """The NNX module (base + adapters); call it inside a jit / grad."""
        return nnx.merge(self.graphdef, _join(self.adapters, self.base))

    def logits(self, tokens) -> jax.Array:
        """float32 logits [B, S, V] of the adapted model (jitted)."""
        return _logits(self, _tokens(self.config, tokens))

    def train_model(self) -> TrainModel:
        """The `TrainModel` view for `losses.py`: params = adapters, frozen = the base."""
        fmts = tuple((p, "f32") for p in sorted(_flatten(self.adapters), key=_key))
        meta = (self.config, self.precision, self.graphdef, fmts, False, self.kernels)
        return TrainModel(self.adapters, self.base, *meta)

    def serving_model(self) -> Model:
        """A `v4jax.Model` of base + unmerged adapters, for `prefill` / `decode_step` /
        `generate` (not for `export_hf`, which has no names for adapters: see `merge`)."""
        graphdef, state = nnx.split(self.module())
        return Model(self.config, self.precision, graphdef, state, self.kernels)

    def replace(self, **changes) -> LoraModel:
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    LoraModel,
    data_fields=["adapters", "base"],
    meta_fields=["spec", "config", "precision", "graphdef", "base_graphdef", "kernels"],
)


@numerics_jit
def _logits(lm: LoraModel, tokens):
    return lm.module()(tokens)


def _tokens(cfg: ModelConfig, tokens) -> jax.Array:
    t = np.asarray(tokens)
    if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer) or not t.size:
        raise ValueError(
            f"tokens: expected a non-empty integer array [B, S], got {t.dtype}{t.shape}"
        )
    if t.min() < 0 or t.max() >= cfg.vocab_size:
        raise ValueError(
            f"tokens: ids must be in [0, {cfg.vocab_size}), found [{t.min()}, {t.max()}]"
        )
    return jnp.asarray(t, jnp.int32)


def _key(path: Path) -> tuple[str, ...]:
    return tuple(map(str, path))


def _target_linears(module, spec: LoraSpec) -> list[tuple[Path, Linear]]:
    """(path, module) of every Linear adapted by `spec`, sorted by path."""
    rels = {TARGETS[t] for t in spec.targets}
    found = []
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, Linear):
            continue
        if path[:1] == ("segments",):
            rel = tuple(path[4:])  # segments.{s}.blocks.{j}.<rel>
        elif path[:2] == ("mtp", "block") and spec.mtp:
            rel = tuple(path[2:])
        else:
            continue
        if rel in rels:
            found.append((tuple(path), node))
    return sorted(found, key=lambda pn: _key(pn[0]))


def _dims(lin: Linear) -> tuple[tuple[int, ...], int, int, tuple]:
    """(leading stacked dims, O, I, logical axes of the weight) of a (possibly abstract) Linear."""
    *lead, o, i = lin.weight.get_value().shape
    axes = lin.weight.get_metadata().get("out_sharding") or (None,) * (len(lead) + 2)
    return tuple(lead), o, i * (2 if lin.fmt == "fp4" else 1), tuple(axes)


def _param(a, axes) -> nnx.Param:
    return nnx.Param(a, out_sharding=axes, eager_sharding=False)


def attach(
    model: Model,
    rank: int,
    alpha: float | None = None,
    targets=DEFAULT_TARGETS,
    *,
    seed: int = 0,
    mtp: bool = True,
) -> LoraModel:
    """Adapters on `model`'s target linears: A random (seeded), B = 0, scale alpha / rank
    (alpha defaults to 2 * rank, the V4 recipe's 16 / 32). The base arrays are shared, not
    copied, and never change."""
    spec = LoraSpec(rank, float(2 * rank if alpha is None else alpha), targets, mtp)
    module = nnx.merge(model.graphdef, model.state)
    key = jax.random.key(seed)
    for n, (_, lin) in enumerate(_target_linears(module, spec)):
        lead, o, i, axes = _dims(lin)
        bound = 1.0 / math.sqrt(i)
        a = jax.random.uniform(jax.random.fold_in(key, n), (*lead, rank, i), F32, -bound, bound)
        lin.lora_a = _param(a, (*axes[:-2], None, axes[-1]))
        lin.lora_b = _param(jnp.zeros((*lead, o, rank), F32), (*axes[:-2], axes[-2], None))
        lin.lora_scale = spec.scale
    graphdef, state = nnx.split(module)
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}
    ad = _unflatten({p: a for p, a in flat.items() if p[-1] in LEAVES})
    base = _unflatten({p: a for p, a in flat.items() if p[-1] not in LEAVES})
    return LoraModel(
        ad, base, spec, model.config, model.precision, graphdef, model.graphdef, model.kernels
    )


# ------------------------------------------------------------------------- training


def value_and_grad(lm: LoraModel, tokens, mask=None, **weights):
    """(loss, metrics, grads) of `losses.value_and_grad` (same keywords: mtp_weight,
    balance_weight, indexer_weight, indexer_stage) with the adapters as the only trained
    parameters: `grads` has the adapters' tree, the base gets none. `balance_weight` defaults
    to 0 here: the routers stay frozen (biases included), so the balance term would only steer
    the adapters to reshape the frozen routing."""
    weights = {"balance_weight": 0.0, **weights}
    return losses.value_and_grad(lm.train_model(), tokens, mask, **weights)


def evaluate(lm: LoraModel, tokens, mask=None) -> float:
    """Mean next-token cross-entropy (`losses.loss`'s LM term) over the targets of `mask`."""
    t = _tokens(lm.config, tokens)
    m = jnp.ones(t.shape, F32) if mask is None else jnp.asarray(mask, F32)
    return float(_lm_loss(lm, t, m))


@numerics_jit
def _lm_loss(lm: LoraModel, tokens, mask):
    _, metrics = losses.loss(lm.train_model(), tokens, mask, mtp_weight=0.0, balance_weight=0.0)
    return metrics["lm"]


def make_optimizer(
    adapters, *, schedule: optax.ScalarOrSchedule = 1e-4, config: optim.OptimConfig = LORA_ADAMW
) -> optax.GradientTransformation:
    """AdamW for the adapters: global-norm clip -> Adam -> decoupled decay -> -lr (the AdamW
    group of `optim.make_optimizer`, whose name rules know no adapter leaves)."""
    rates = jax.tree.map(lambda _: config.adam_weight_decay, adapters)
    clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm else optax.identity()
    adam = optax.scale_by_adam(
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        mu_dtype=config.mu_dtype,
        nesterov=config.adam_nesterov,
    )
    return optax.chain(
        clip, adam, optim.add_decoupled_weight_decay(rates), optax.scale_by_learning_rate(schedule)
    )


def make_step(optimizer: optax.GradientTransformation, **weights):
    """`step(lm, opt_state, tokens [B, S], mask [B, S]) -> (lm, opt_state, metrics)`: one
    optimizer update of the adapters (`weights` as `value_and_grad`'s). The base is only read:
    never donated, never copied."""

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def apply(adapters, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, optax.tree.norm(grads)

    def step(lm: LoraModel, opt_state, tokens, mask=None):
        loss, metrics, grads = value_and_grad(lm, tokens, mask, **weights)
        adapters, opt_state, norm = apply(lm.adapters, opt_state, grads)
        metrics = {k: v for k, v in metrics.items() if k != "expert_counts"}
        return lm.replace(adapters=adapters), opt_state, dict(metrics, grad_norm=norm)

    return step


# ------------------------------------------------------------------------- merging

_FMT = {
    jnp.dtype(jnp.float8_e4m3fn): "fp8",
    jnp.dtype(jnp.int8): "fp4",
    jnp.dtype(jnp.bfloat16): "bf16",
}


def merge(lm: LoraModel, *, quantize: bool = True) -> Model:
    """A `v4jax.Model` with W' = W + (alpha / R) B A in every adapted linear: re-quantised in
    the release format (exportable; rounding as the module docstring says), or float32
    weights with `quantize=False` (not exportable; exact in float32 numerics, while bf16
    activations round them to bf16 at the matmul)."""
    flat = _flatten(lm.base)
    for path, ad in _by_linear(lm.adapters).items():
        w_path, s_path = (*path, "weight"), (*path, "scale")
        fmt = _FMT[jnp.dtype(flat[w_path].dtype)]
        delta = jnp.einsum(
            "...or,...ri->...oi", ad["lora_b"], ad["lora_a"], precision=jax.lax.Precision.HIGHEST
        )
        w = release_dequant(fmt, flat[w_path], flat.get(s_path)) + F32(lm.spec.scale) * delta
        if not quantize:
            flat[w_path] = w
            continue
        flat[w_path], scale = release_quantize(fmt, w)
        if scale is not None:
            flat[s_path] = scale
    graphdef, state = nnx.split(nnx.merge(lm.base_graphdef, _unflatten(flat)))
    return Model(lm.config, lm.precision, graphdef, state, lm.kernels)


def _by_linear(adapters: dict) -> dict[Path, dict]:
    out: dict[Path, dict] = {}
    for p, a in _flatten(adapters).items():
        out.setdefault(p[:-1], {})[p[-1]] = a
    return dict(sorted(out.items(), key=lambda kv: _key(kv[0])))


# ------------------------------------------------------------------------- adapter files


def _release_names(cfg: ModelConfig, path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Adapter leaf path -> [(release-style tensor name, index into the leaf)], one per layer:
    `layers.{L}.attn.wq_a.lora_A.weight` (A [R, I]) / `lora_B` (B [O, R]), `mtp.0.` likewise."""
    *lin, leaf = path
    suffix = "lora_A.weight" if leaf == "lora_a" else "lora_B.weight"
    if lin[0] == "mtp":
        return [(".".join(["mtp.0", *map(str, lin[2:]), suffix]), ())]
    s, j, rel = lin[1], lin[3], ".".join(map(str, lin[4:]))
    layer = {slot: n for n, slot in enumerate(layer_slots(cfg))}
    reps = layer_plan(cfg)[s].repeats
    return [(f"layers.{layer[(s, r, j)]}.{rel}.{suffix}", (r,)) for r in range(reps)]


def save_adapters(lm: LoraModel, path: str | os.PathLike) -> None:
    """Writes the adapters to one safetensors file (float32, per-layer names), with the rank,
    alpha, targets, the base's config and its `fingerprint` in the header metadata."""
    tensors = {}
    for p, a in _flatten(lm.adapters).items():
        host = np.asarray(a)
        tensors.update({name: host[idx] for name, idx in _release_names(lm.config, p)})
    meta = {
        "format": FORMAT,
        "rank": str(lm.spec.rank),
        "alpha": repr(lm.spec.alpha),
        "targets": json.dumps(list(lm.spec.targets)),
        "mtp": json.dumps(lm.spec.mtp),
        "config": json.dumps(to_dict(lm.config), sort_keys=True),
        "base_fingerprint": fingerprint(lm),
    }
    write_safetensors(path, tensors, meta)


def load_adapters(model: Model, path: str | os.PathLike, *, check_base: bool = True) -> LoraModel:
    """Adapters saved by `save_adapters` on `model`. Refused (CheckpointError) when the file
    was written for another config, or (`check_base`) for other base weights."""
    with SafetensorsFile(path) as f:
        meta = f.metadata
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{path}: not a v4jax LoRA adapter file (format "
                f"{meta.get('format')!r}, expected {FORMAT!r})"
            )
        _check_config(path, json.loads(meta["config"]), to_dict(model.config))
        spec = LoraSpec(
            int(meta["rank"]),
            float(meta["alpha"]),
            tuple(json.loads(meta["targets"])),
            json.loads(meta["mtp"]),
        )
        lm = attach(model, spec.rank, spec.alpha, spec.targets, mtp=spec.mtp)
        flat, names = {}, set()
        for p, a in _flatten(lm.adapters).items():
            parts = []
            for name, _ in _release_names(lm.config, p):
                if name not in f:
                    raise CheckpointError(f"{path}: adapter tensor {name!r} missing")
                parts.append(np.asarray(f.get(name)))
                names.add(name)
            arr = np.stack(parts) if p[0] == "segments" else parts[0]
            if arr.shape != a.shape or arr.dtype != a.dtype:
                raise CheckpointError(
                    f"{path}: {'.'.join(map(str, p))} is {arr.dtype}"
                    f"{arr.shape}, expected {a.dtype}{a.shape}"
                )
            flat[p] = jnp.asarray(arr)
        if extra := sorted(set(f.keys()) - names):
            raise CheckpointError(f"{path}: tensor {extra[0]!r} is not an adapter of this spec")
    lm = lm.replace(adapters=_unflatten(flat))
    if check_base and (fp := fingerprint(lm)) != meta["base_fingerprint"]:
        raise CheckpointError(
            f"{path}: the base weights differ from the adapters' base "
            f"(fingerprint {fp[:12]} != {meta['base_fingerprint'][:12]})"
        )
    return lm


def _check_config(path, theirs: dict, ours: dict) -> None:
    ours = json.loads(json.dumps(ours))  # tuples -> lists, as stored
    diff = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if diff:
        what = ", ".join(f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in diff[:3])
        raise CheckpointError(
            f"{path}: adapters were trained for another model config ({what}; file vs this model)"
        )


def fingerprint(lm: LoraModel) -> str:
    """sha256 (hex) of the config and of the base weights the adapters modify (weights and
    scales of every adapted linear, each reduced on its device to a position-weighted byte
    checksum: no host copy of the weights, the same value on every backend)."""
    h = hashlib.sha256(json.dumps(to_dict(lm.config), sort_keys=True).encode())
    base = _flatten(lm.base)
    for path in _by_linear(lm.adapters):
        for leaf in ("weight", "scale"):
            if (a := base.get((*path, leaf))) is not None:
                h.update(f"{_key(path)}.{leaf} {a.dtype}{a.shape} {int(checksum(a))};".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------- accounting


@dataclasses.dataclass(frozen=True)
class LoraCount:
    """Trainable parameters and training memory (bytes) of LoRA against full fine-tuning.

    `*_optimizer_bytes`: optimizer state (LoRA: AdamW's two float32 moments; full: the V4
    optimizer, Muon's one moment on matrices + AdamW's two elsewhere, or AdamW everywhere).
    `*_train_bytes`: what a step keeps resident besides activations: LoRA = the base in its
    release formats + adapter masters, gradients, moments; full = float32 masters, gradients,
    moments (the release-format base is not needed once dequantised into the masters)."""

    lora_params: int
    full_params: int
    lora_optimizer_bytes: int
    full_optimizer_bytes: int
    base_bytes: int
    lora_train_bytes: int
    full_train_bytes: int

    @property
    def param_ratio(self) -> float:
        return self.lora_params / self.full_params

    @property
    def optimizer_ratio(self) -> float:
        return self.lora_optimizer_bytes / self.full_optimizer_bytes

    @property
    def memory_ratio(self) -> float:
        return self.lora_train_bytes / self.full_train_bytes


def _nbytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def count(
    cfg: ModelConfig,
    rank: int,
    targets=DEFAULT_TARGETS,
    *,
    mtp: bool = True,
    full_optimizer: str = "muon",
) -> LoraCount:
    """`LoraCount` from abstract shapes only (`nnx.eval_shape` / `jax.eval_shape`: nothing is
    allocated, so it runs for `config.flash()` / `pro()` on any machine)."""
    spec = LoraSpec(rank, float(2 * rank), targets, mtp)
    prec = Precision(Numerics.BF16, F32)
    module = nnx.eval_shape(lambda: Transformer(cfg, prec))
    ad = {}
    for path, lin in _target_linears(module, spec):
        lead, o, i, _ = _dims(lin)
        ad[(*path, "lora_a")] = jax.ShapeDtypeStruct((*lead, rank, i), F32)
        ad[(*path, "lora_b")] = jax.ShapeDtypeStruct((*lead, o, rank), F32)
    ad = _unflatten(ad)
    lora_opt = _nbytes(jax.eval_shape(make_optimizer(ad).init, ad))
    graphdef, state = nnx.split(module)
    params = _full_params(state)
    full_tx = optim.make_optimizer(params, schedule=1e-4, kind=full_optimizer)
    full_opt = _nbytes(jax.eval_shape(full_tx.init, params))
    n_lora = sum(math.prod(a.shape) for a in jax.tree.leaves(ad))
    n_full = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    base = _nbytes(state)
    return LoraCount(
        n_lora,
        n_full,
        lora_opt,
        full_opt,
        base,
        base + 2 * _nbytes(ad) + lora_opt,
        2 * _nbytes(params) + full_opt,
    )


def _full_params(state: nnx.State) -> dict:
    """Shapes of the float32 masters that full fine-tuning trains (`model.trainable`'s rule:
    every release-format leaf but the router biases; FP4 [..., I / 2] -> [..., I])."""
    out = {}
    for p, v in nnx.to_flat_state(state):
        a = v.get_value()
        fmt = _FORMATS.get(jnp.dtype(a.dtype))
        if fmt is None or tuple(p[-2:]) == ("gate", "bias"):
            continue
        shape = (*a.shape[:-1], 2 * a.shape[-1]) if fmt == "fp4" else a.shape
        out[tuple(p)] = jax.ShapeDtypeStruct(shape, F32)
    return _unflatten(out)
