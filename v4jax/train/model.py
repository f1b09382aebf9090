"""The trainable form of a V4 model: float32 master weights, optional QAT (V4 report §3.4;
release formats as the reference's convert.py).

`trainable(model)` dequantises every FP8 / FP4 / bf16 release weight to its exact float32 value
(FP4 [O, I/2] int8 -> [O, I]); those masters are the trained `params`. What no optimizer
touches stays apart in `frozen`: the router's selection bias (moved by `update_router_bias`
in `losses.py`), the hash table `tid2eid`, and the E8M0 scale leaves, which the forward ignores
(`layers.dequant` returns a float32 leaf as is) and `to_model` recomputes.

QAT (`qat=True`) is decided here, at the parameter tree, not inside the modules: before the
forward each master is fake-quantised in its release format (FP8 e4m3 with 128x128 E8M0 block
scales, FP4 e2m1 with 1x32 E8M0 scales, bf16 rounding) with a straight-through gradient, and
the model runs in the "reference" numerics (FP8 / FP4 activation simulations). One place
covers every leaf kind (norms, embedding, router and compressor weights are bf16 release
tensors too), the inference modules stay unchanged, and `to_model` quantises with the same
functions, so the exported release weights are exactly the ones the training forward used.
Without QAT the forward runs the masters in the "bf16" numerics (no quantisation anywhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from v4jax.api import Model
from v4jax.config import ModelConfig
from v4jax.model import moe_parallel
from v4jax.model.attention import round_straight_through
from v4jax.model.attention import straight_through as ste
from v4jax.model.transformer import Transformer
from v4jax.numerics import Numerics, Precision, unpack_fp4
from v4jax.numerics.policy import jit as numerics_jit

__all__ = [
    "TrainModel",
    "fake_quant",
    "quantize",
    "release_named",
    "to_model",
    "trainable",
]

F32 = jnp.float32
Path = tuple[str | int, ...]
FP8_BLOCK, FP8_MAX, FP4_BLOCK, FP4_MAX = 128, 448.0, 32, 6.0
_FORMATS = {
    jnp.dtype(jnp.float8_e4m3fn): "fp8",
    jnp.dtype(jnp.int8): "fp4",
    jnp.dtype(jnp.bfloat16): "bf16",
    jnp.dtype(jnp.float32): "f32",
}


@dataclasses.dataclass(frozen=True)
class TrainModel:
    """A model in trainable form (a pytree: `params` and `frozen` are its data).

    `params`: nested dict (our state paths) of float32 masters, every trained leaf.
    `frozen`: nested dict of the leaves not trained (router `bias`, `tid2eid`, scales).
    `formats`: (path, release format "fp8" / "fp4" / "bf16" / "f32") of every param.
    `precision`: the training forward's numerics ("reference" + bf16 under QAT, else "bf16").
    """

    params: dict
    frozen: dict
    config: ModelConfig
    precision: Precision
    graphdef: nnx.GraphDef
    formats: tuple[tuple[Path, str], ...]
    qat: bool = False
    kernels: str = "auto"
    mesh: jax.sharding.Mesh | None = None  # the mesh the params live on (from the model)
    rules: Any = None  # its sharding rules (`sharding.TRAIN` for training)
    moe_buffer: float | None = None  # expert-parallel receive bound (`moe_parallel.buffer`)

    def weights(self) -> dict:
        """The state the forward runs on: params (fake-quantised under QAT) + frozen."""
        params = self.params
        if self.qat:
            fmt = dict(self.formats)
            flat = _flatten(params)
            params = _unflatten(
                {p: fake_quant(fmt[p], w, straight_through=True) for p, w in flat.items()}
            )
        return _join(params, self.frozen)

    def module(self) -> Transformer:
        """The NNX module on `weights()` (call it inside a jit / grad)."""
        return nnx.merge(self.graphdef, self.weights())

    def logits(self, tokens) -> jax.Array:
        """float32 logits [B, S, V] of the training forward (jitted)."""
        return _logits(self, jnp.asarray(tokens, jnp.int32))

    def replace(self, **changes) -> TrainModel:
        return dataclasses.replace(self, **changes)

    @contextlib.contextmanager
    def rules_context(self):
        """The context model code is traced in: the mesh's activation rules (constraints,
        expert-parallel MoE) when the params live on a mesh, and the expert-parallel buffer
        bound `moe_buffer` (None: dropless)."""
        with moe_parallel.buffer(self.moe_buffer):
            if self.mesh is None:
                yield
            else:
                with sharding.use_rules(self.mesh, self.rules):
                    yield

    def context_shards(self) -> int:
        """How many shards the rules split the sequence into on this mesh (1: none)."""
        if self.mesh is None:
            return 1
        axes = sharding.rules_for(self.rules).activations.get("length", ())
        return math.prod(self.mesh.shape[a] for a in axes if a in self.mesh.shape)

    def place_batch(self, x, batch_axis: int = 0) -> jax.Array:
        """A host batch placed for the step: its `batch_axis` split over the mesh's data axes
        as the activation rules split "batch" (the other axes whole); as is without a mesh."""
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        names = tuple("batch" if i == batch_axis else None for i in range(x.ndim))
        table = sharding.rules_for(self.rules).activations
        spec = sharding.resolve(names, x.shape, dict(self.mesh.shape), table)
        return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))


jax.tree_util.register_dataclass(
    TrainModel,
    data_fields=["params", "frozen"],
    meta_fields=[
        "config",
        "precision",
        "graphdef",
        "formats",
        "qat",
        "kernels",
        "mesh",
        "rules",
        "moe_buffer",
    ],
)


@numerics_jit
def _logits(tm: TrainModel, tokens):
    with tm.rules_context():
        return tm.module()(tokens)


def trainable(model: Model, *, qat: bool = False) -> TrainModel:
    """`v4jax.Model` (release formats) -> `TrainModel` with exact float32 masters.

    qat=False: the forward runs in the "bf16" numerics with the model's activation dtype.
    qat=True: "reference" numerics (bf16), masters fake-quantised in the release formats."""
    dtype = jnp.bfloat16 if qat else model.precision.dtype
    prec = Precision(Numerics.REFERENCE if qat else Numerics.BF16, dtype)
    graphdef, _ = _abstract(model.config, prec, model.kernels)
    leaves = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(model.state)}
    params, frozen, formats = {}, {}, []
    for path, a in leaves.items():
        fmt = _FORMATS.get(jnp.dtype(a.dtype))
        if fmt is None or path[-2:] == ("gate", "bias"):
            frozen[path] = a
            continue
        scale = leaves.get(_scale_path(path)) if fmt in ("fp8", "fp4") else None
        params[path] = _same_placement(release_dequant(fmt, a, scale), a)
        formats.append((path, fmt))
    return TrainModel(
        _unflatten(params),
        _unflatten(frozen),
        model.config,
        prec,
        graphdef,
        tuple(sorted(formats, key=lambda pf: tuple(map(str, pf[0])))),
        qat,
        model.kernels,
        model.mesh,
        model.rules,
    )


def _same_placement(x: jax.Array, like: jax.Array) -> jax.Array:
    """x placed as `like` (a mesh-sharded release weight: the master keeps its PartitionSpec,
    which names the same logical axes although FP4 masters are twice as wide)."""
    sh = getattr(like, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        return jax.device_put(x, sh)
    return x


def to_model(tm: TrainModel, *, numerics: str | None = None, dtype=None) -> Model:
    """The trained weights back in the release formats (quantised with the release recipe,
    `quantize`), as a `v4jax.Model` that `v4jax.export_hf` / `Model.save` write. Numerics and
    dtype default to the training forward's."""
    prec = Precision(
        Numerics.parse(numerics) if numerics else tm.precision.numerics,
        dtype if dtype is not None else tm.precision.dtype,
    )
    graphdef, abstract = _abstract(tm.config, prec, tm.kernels)
    out = dict(_flatten(tm.frozen))
    for path, fmt in tm.formats:
        w, s = quantize(fmt, _get(tm.params, path))
        out[path] = w
        if s is not None:
            out[_scale_path(path)] = s
    flat = []
    for p, v in nnx.to_flat_state(abstract):
        a = out.pop(tuple(p))
        want = v.get_value()
        if a.shape != want.shape or a.dtype != want.dtype:
            raise ValueError(f"{'.'.join(map(str, p))}: {a.dtype}{a.shape}, expected {want}")
        flat.append((p, v.replace(a)))
    if out:
        raise ValueError(f"leaves not in the model: {sorted(out, key=str)[:3]}")
    return Model(tm.config, prec, graphdef, nnx.from_flat_state(flat), tm.kernels)


# ------------------------------------------------------------------------- formats


@functools.partial(jax.jit, static_argnums=0)  # no bf16 round trips: plain jit nests anywhere
def release_dequant(fmt: str, w: jnp.ndarray, scale: jnp.ndarray | None) -> jnp.ndarray:
    """A release-format leaf (any leading axes: layers, experts) -> exact float32."""
    if fmt == "fp8":
        o, i = w.shape[-2:]
        s = jnp.repeat(jnp.repeat(scale.astype(F32), FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)
        return w.astype(F32) * s[..., :o, :i]
    if fmt == "fp4":
        return unpack_fp4(w) * jnp.repeat(scale.astype(F32), FP4_BLOCK, axis=-1)
    return w.astype(F32)


def _pow2_exponent(amax: jnp.ndarray, qmax: float) -> jnp.ndarray:
    """Smallest e with qmax * 2^e >= amax, in [-127, 127] (zero amax -> -127): the release
    recipe's exact ceil(log2(amax / qmax)) (`checkpoint.synthetic._pow2_exponent`)."""
    qm, qe = math.frexp(qmax)
    m, x = jnp.frexp(amax.astype(F32))
    e = x - qe + (m > qm).astype(jnp.int32)
    return jnp.clip(jnp.where(amax > 0, e, -127), -127, 127)


def _fp8_parts(w: jnp.ndarray):
    """[..., O, I] -> (e4m3 codes [..., O, I], block exponents [..., O/128, I/128])."""
    o, i = w.shape[-2:]
    bo, bi = -(-o // FP8_BLOCK), -(-i // FP8_BLOCK)
    lead = w.shape[:-2]
    pad = jnp.pad(
        jnp.abs(w), [(0, 0)] * len(lead) + [(0, bo * FP8_BLOCK - o), (0, bi * FP8_BLOCK - i)]
    )
    amax = jnp.max(pad.reshape(*lead, bo, FP8_BLOCK, bi, FP8_BLOCK), axis=(-3, -1))
    exp = _pow2_exponent(amax, FP8_MAX)
    full = jnp.repeat(jnp.repeat(exp, FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)[..., :o, :i]
    q = jnp.clip(jnp.ldexp(w, -full), -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return q, exp, full


def _fp4_parts(w: jnp.ndarray):
    """[..., O, I] -> (e2m1 magnitudes [..., O, I] float32, sign bits, exponents [..., I/32])."""
    *lead, o, i = w.shape
    if i % FP4_BLOCK:
        raise ValueError(f"FP4 rows need a multiple of {FP4_BLOCK} inputs, got shape {w.shape}")
    blocks = w.reshape(*lead, o, i // FP4_BLOCK, FP4_BLOCK)
    exp = _pow2_exponent(jnp.max(jnp.abs(blocks), axis=-1), FP4_MAX)
    q = jnp.clip(jnp.ldexp(blocks, -exp[..., None]), -FP4_MAX, FP4_MAX).reshape(w.shape)
    a = jnp.abs(q)  # round to nearest even on the e2m1 grid: step 0.5 / 1 / 2 per binade
    per = jnp.where(a < 2, F32(2), jnp.where(a < 4, F32(1), F32(0.5)))
    return jnp.rint(a * per) / per, jnp.signbit(q), exp


def fake_quant(fmt: str, w: jnp.ndarray, *, straight_through: bool = False) -> jnp.ndarray:
    """float32 w -> the float32 value of its release-format encoding (`quantize` then
    dequantise); with `straight_through` the gradient is the identity."""
    if fmt == "f32":
        return w
    if fmt == "bf16":
        return round_straight_through(w, jnp.bfloat16) if straight_through else _bf16(w)
    fn = _fake_fp8 if fmt == "fp8" else _fake_fp4
    return ste(fn, w.astype(F32)) if straight_through else fn(w)


def _bf16(w):
    return w.astype(jnp.bfloat16).astype(F32)


def _fake_fp8(w):
    q, _, full = _fp8_parts(w)
    return jnp.ldexp(q.astype(F32), full)


def _fake_fp4(w):
    mag, neg, exp = _fp4_parts(w)
    val = jnp.where(neg & (mag > 0), -mag, mag)  # code 8 (-0) reads as +0
    *lead, o, i = w.shape
    blocks = val.reshape(*lead, o, i // FP4_BLOCK, FP4_BLOCK)
    return jnp.ldexp(blocks, exp[..., None]).reshape(w.shape)


_E2M1_CODE = np.array([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], np.uint8)  # code of 2 * |value|


@functools.partial(jax.jit, static_argnums=0)
def quantize(fmt: str, w: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """float32 master -> (release weight, E8M0 scale or None), bit for bit the release recipe
    (`checkpoint.synthetic.quantize_fp8_blocks` / `quantize_fp4_rows`, round to nearest even)."""
    if fmt == "fp8":
        q, exp, _ = _fp8_parts(w)
        return q, _e8m0(exp)
    if fmt == "fp4":
        mag, neg, exp = _fp4_parts(w)
        codes = jnp.asarray(_E2M1_CODE)[(mag * 2).astype(jnp.int32)] | (neg.astype(jnp.uint8) << 3)
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return jax.lax.bitcast_convert_type(packed, jnp.int8), _e8m0(exp)
    if fmt == "bf16":
        return w.astype(jnp.bfloat16), None
    return w.astype(F32), None


def _e8m0(exp: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.bitcast_convert_type((exp + 127).astype(jnp.uint8), jnp.float8_e8m0fnu)


# ------------------------------------------------------------------------- release names

_TOP_NAMES = {
    ("embed",): "embed.weight",
    ("head", "weight"): "head.weight",
    ("norm", "weight"): "norm.weight",
    ("hc_head", "fn"): "hc_head_fn",
    ("hc_head", "base"): "hc_head_base",
    ("hc_head", "scale"): "hc_head_scale",
}


def release_named(tree: dict) -> dict[str, jax.Array]:
    """A params-shaped tree (gradients, masters) -> {official release tensor name: array},
    each shaped like the dequantised release weight (routed experts one [O, I] per expert).
    The inverse of `checkpoint.names.locate`; layer numbers follow the stacked segments
    (`names.layer_slots`: segment, then repetition, then block)."""
    base, layer0 = {}, 0
    for s in sorted(tree.get("segments", {})):
        blocks = tree["segments"][s]["blocks"]
        reps = next(iter(_flatten(blocks).values())).shape[0]
        base[s] = (layer0, len(blocks))
        layer0 += reps * len(blocks)
    out = {}
    for path, a in _flatten(tree).items():
        if path in _TOP_NAMES:
            out[_TOP_NAMES[path]] = a
        elif path[0] == "segments":
            first, per_unit = base[path[1]]
            for r in range(a.shape[0]):
                layer = first + r * per_unit + path[3]
                out.update({f"layers.{layer}.{n}": x for n, x in _block_names(path[4:], a[r])})
        elif path[:2] == ("mtp", "block"):
            out.update({f"mtp.0.{n}": x for n, x in _block_names(path[2:], a)})
        elif path[:2] == ("mtp", "hc_head"):
            out[f"mtp.0.hc_head_{path[2]}"] = a
        elif path[0] == "mtp":
            out["mtp.0." + ".".join(map(str, path[1:]))] = a
        else:
            raise KeyError(f"{path}: not a parameter of a V4 model")
    return out


def _block_names(rest: Path, a: jax.Array) -> list[tuple[str, jax.Array]]:
    if rest[:2] == ("ffn", "experts"):
        return [(f"ffn.experts.{e}.{rest[2]}.weight", a[e]) for e in range(a.shape[0])]
    if rest[0] in ("hc_attn", "hc_ffn"):
        return [(f"{rest[0]}_{rest[1]}", a)]
    return [(".".join(map(str, rest)), a)]


# ------------------------------------------------------------------------- trees


def _abstract(cfg, prec: Precision, kernels: str):
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, prec, kernels)))


def _scale_path(path: Path) -> Path:
    """The E8M0 scale leaf of a quantised weight: `.../weight` -> `.../scale` (linears),
    `experts/w1` -> `experts/w1_scale` (stacked routed experts)."""
    if path[-1] == "weight":
        return (*path[:-1], "scale")
    return (*path[:-1], f"{path[-1]}_scale")


def _flatten(tree: dict, prefix: Path = ()) -> dict[Path, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _unflatten(flat: dict[Path, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _get(tree: dict, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def _join(a: dict, b: dict) -> dict:
    """Two nested dicts with disjoint leaves -> one."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _join(out[k], v) if k in out else v
    return out
