"""Gradients of the sparse-attention op (`v4jax/kernels/sparse_attention/`): the reference
backward (`reference_bwd.py`) == `jax.grad` of the forward reference, and the Pallas backward
kernels == the reference backward.

Oracles. `jax.grad` of `sparse_attention_reference` (plain autodiff of the forward
specification) and, in bfloat16, the float64 gradient of the exact softmax computed here in
numpy from the same (bf16-valued) inputs. Kernels run in Pallas' interpreters on CPU (the GPU
kernel in the generic one, the TPU kernel in the TPU one with its race detector).

Tolerances (per gradient, relative to its largest element, max and l2; cotangent ~ N(0, 1)):
- float32: reference backward vs autodiff: max <= 1e-5 (both are the exact gradient up to fp32
  summation order; measured <= 3.0e-6 at D = 512). Kernel vs reference backward: max <= 1e-5
  (a few fp32 ulps of the scale after length-512 products; measured 1.6e-6 on one CPU, 4.3e-6
  on an AVX-512 one, where each is within 4.7e-6 of the float64 gradient).
- bfloat16, reference backward vs autodiff: they round differently on purpose. The backward
  rounds P and dS to bf16 before its products and takes Delta = dO . o from the bf16 output
  (as the kernels, FlashAttention-2 and the DeepSeek V3.2 sparse-MLA backward do); autodiff
  keeps those in fp32 and passes the forward's bf16 rounding of P through as the identity.
  Both are measured against the float64 gradient of the exact softmax (`exact_grads`): the
  backward within l2 9.2e-3 / max 5.9e-3 (the bf16 Delta costs up to 4x in a peaky softmax:
  with an fp32 Delta the same cases give l2 <= 2.6e-3, which is the final bf16 rounding);
  autodiff within l2 2.8e-3 except dkv where rows repeat (it scatter-adds in bf16: l2 6.2e-2,
  max 0.10 at ~130 repeats per row). Bounds: backward vs float64 max and l2 <= 2^-6 (1.6e-2);
  backward vs autodiff max <= 2^-5, l2 <= 2^-6 (measured 6.0e-3 / 9.4e-3), dkv only where no
  row repeats more than 4 times per sequence. Catches: a dropped P^T.dO or dS^T.q term, a
  lost repeat, a wrong sign, P from the forward's running max instead of lse (all O(1)).
- bfloat16, kernel vs reference backward (the same rounding points, fp32 order differs, and
  the kernel path's residuals come from the kernel forward): dq and dkv elementwise within 1
  bf16 ulp of themselves plus 2^-9 x max, at most 10% of the elements differing (a P or dS one
  fp32 bit off rounds to the neighbouring bf16 value: a 2^-8 change of one of the terms that
  each dq and dkv element sums, each term at most max); dsink (fp32) max <= 2^-12 (one bf16
  flip of o moves Delta). Measured on one CPU: nothing beyond 1 ulp, <= 0.02% of the elements
  differ, dsink 1.4e-5. On an AVX-512 CPU, whose fp32 exp and sums round differently in the
  two paths (and vary run to run under load), more dS values land on the other side of a bf16
  rounding: up to 6.7% of dq's elements differ (D = 512, K = 96), dkv by up to 1 ulp + 6e-4 x
  max. Rounding mutations (dS or P kept in fp32 in the kernel) fail this bound while passing
  the autodiff one.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from v4jax.kernels.sparse_attention import (
    pallas_gpu,
    pallas_gpu_bwd,
    pallas_tpu,
    pallas_tpu_bwd,
    sparse_attention,
)
from v4jax.kernels.sparse_attention.blocks import BackwardBlockSizes, gpu_backward_block_sizes
from v4jax.kernels.sparse_attention.reference import reference_forward, sparse_attention_reference
from v4jax.kernels.sparse_attention.reference_bwd import (
    backward_stats,
    sparse_attention_reference_bwd,
)

_S = 0.125  # softmax scale


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    s: int
    h: int
    d: int
    k: int  # index-list length
    n: int  # pool rows
    dtype: str
    fill: str  # full | random | partial | lengths | late | dups | none

    @property
    def name(self) -> str:
        return f"b{self.b}s{self.s}h{self.h}d{self.d}k{self.k}n{self.n}-{self.dtype}-{self.fill}"


def _indices(rng, c: Case) -> np.ndarray:
    """[B, S, K]; `dups`: entries drawn from 5 rows (repeats within and across blocks), every
    7th entry also repeated next to itself; `lengths`: per-sequence valid prefix (ragged
    batch); `late`: no valid entry in the first 64; `partial`: per-query valid prefix;
    `random`: 30% holes."""
    idx = rng.integers(0, c.n, (c.b, c.s, c.k))
    pos = np.arange(c.k)
    keep = np.ones(idx.shape, bool)
    if c.fill == "random":
        keep = rng.random(idx.shape) > 0.3
    elif c.fill == "partial":
        keep = pos < rng.integers(0, c.k + 1, (c.b, c.s, 1))
    elif c.fill == "lengths":
        keep = np.broadcast_to(
            pos < np.maximum(1, c.k * np.arange(c.b, 0, -1) // c.b)[:, None, None], idx.shape
        )
    elif c.fill == "late":
        keep = np.broadcast_to(pos >= min(64, c.k - 1), idx.shape)
    elif c.fill == "none":
        keep = np.zeros(idx.shape, bool)
    elif c.fill == "dups":
        idx = rng.integers(0, min(c.n, 5), idx.shape)
        idx[..., 1::7] = idx[..., ::7][..., : idx[..., 1::7].shape[-1]]
        keep = rng.random(idx.shape) > 0.2
    return np.where(keep, idx, -1).astype(np.int32)


def _inputs(c: Case):
    rng = np.random.default_rng(zlib.crc32(c.name.encode()))
    dt = jnp.dtype(c.dtype)
    q = jnp.asarray(2.0 * rng.standard_normal((c.b, c.s, c.h, c.d)), dt)  # peaky softmaxes
    kv = jnp.asarray(rng.standard_normal((c.b, c.n, c.d)), dt)
    sink = jnp.asarray(2.0 * rng.standard_normal(c.h), jnp.float32)
    g = jnp.asarray(rng.standard_normal(q.shape), dt)
    return q, kv, jnp.asarray(_indices(rng, c)), sink, g


@functools.partial(jax.jit, static_argnames=("impl",))
def _grads(q, kv, idx, sink, g, *, impl: str):
    """(dq, dkv, dsink) of the op (`impl`) or of plain autodiff of the reference ("autodiff")."""
    if impl == "autodiff":
        f = lambda q, kv, sink: sparse_attention_reference(q, kv, idx, sink, scale=_S)
    else:
        kw = dict(scale=_S, implementation=impl, interpret=True)
        f = lambda q, kv, sink: sparse_attention(q, kv, idx, sink, **kw)
    return jax.vjp(f, q, kv, sink)[1](g)


def exact_grads(q, kv, idx, sink, g):
    """float64 gradients of the unrounded op, in numpy (an oracle independent of JAX)."""
    q, kv, sink, g = (np.asarray(x, np.float64) for x in (q, kv, sink, g))
    idx = np.asarray(idx)
    valid = idx >= 0
    rows = np.take_along_axis(kv[:, None], np.maximum(idx, 0)[..., None], axis=2)
    rows = np.where(valid[..., None], rows, 0.0)  # [B, S, K, D]
    s = np.where(valid[:, :, None], np.einsum("bshd,bskd->bshk", q, rows) * _S, -np.inf)
    m = np.maximum(s.max(-1), sink)
    e, e_sink = np.exp(s - m[..., None]), np.exp(sink - m)
    den = e.sum(-1) + e_sink
    p = e / den[..., None]
    delta = np.einsum("bshd,bshd->bsh", g, np.einsum("bshk,bskd->bshd", p, rows))
    ds = p * (np.einsum("bshd,bskd->bshk", g, rows) - delta[..., None])
    dq = _S * np.einsum("bshk,bskd->bshd", ds, rows)
    c = _S * np.einsum("bshk,bshd->bskd", ds, q) + np.einsum("bshk,bshd->bskd", p, g)
    dkv = np.zeros(kv.shape)
    for i in range(kv.shape[0]):
        np.add.at(dkv[i], idx[i][valid[i]], c[i][valid[i]])
    return dq, dkv, -(e_sink / den * delta).sum((0, 1))


def _errors(got, want) -> tuple[float, float]:
    """(max |got - want| / max |want|, ||got - want|| / ||want||); 0 when want is all 0."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    if not want.any():
        return float(np.abs(got).max()), float(np.abs(got).max())
    diff = got - want
    return float(np.abs(diff).max() / np.abs(want).max()), float(
        np.linalg.norm(diff) / np.linalg.norm(want)
    )


def _max_repeats(idx) -> int:
    """Most occurrences of one pool row among one sequence's valid entries."""
    idx = np.asarray(idx)
    return max((np.bincount(i[i >= 0]).max() for i in idx if (i >= 0).any()), default=0)


def assert_close_to_autodiff(got, want, dtype, idx) -> None:
    for name, x, w in zip(("dq", "dkv", "dsink"), got, want, strict=True):
        mx, l2 = _errors(x, w)
        if jnp.dtype(dtype) == jnp.float32:
            assert mx <= 1e-5, (name, mx)
        elif name != "dkv" or _max_repeats(idx) <= 4:  # autodiff sums repeats in bf16
            assert mx <= 2.0**-5 and l2 <= 2.0**-6, (name, mx, l2)


def assert_close_to_exact(got, exact) -> None:
    """bf16 gradients vs the float64 gradient of the exact softmax."""
    for name, x, w in zip(("dq", "dkv", "dsink"), got, exact, strict=True):
        mx, l2 = _errors(x, w)
        assert mx <= 2.0**-6 and l2 <= 2.0**-6, (name, mx, l2)


def assert_kernel_matches(got, want, dtype) -> None:
    """Kernel gradients vs the reference backward (same rounding points)."""
    for name, x, w in zip(("dq", "dkv", "dsink"), got, want, strict=True):
        x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(x).all(), (name, "non-finite")
        diff, scale = np.abs(x - w), max(np.abs(w).max(), np.finfo(np.float32).tiny)
        if jnp.dtype(dtype) == jnp.float32:
            # Two float32 summation orders of the same sums: each within 5e-6 of the float64
            # gradient at D = 512 (measured on an AVX-512 CPU: reference 2.8e-6, kernel 4.7e-6
            # of the max on dkv), so their difference is bounded by the sum, 1e-5.
            assert diff.max() <= 1e-5 * scale, (name, diff.max() / scale)
            continue
        if name == "dsink":  # fp32 in both; Delta moves with a bf16 flip of the output
            assert diff.max() <= 2.0**-12 * scale, (name, diff.max() / scale)
            continue
        mag = np.maximum(np.maximum(np.abs(x), np.abs(w)), np.finfo(np.float32).tiny)
        ulp = np.exp2(np.floor(np.log2(mag)) - 7)
        assert (diff <= ulp + 2.0**-9 * scale).all(), (name, (diff - ulp).max() / scale)
        assert (diff > 0).mean() <= 0.10, (name, (diff > 0).mean())


CASES = [
    Case(1, 3, 1, 64, 1, 8, "float32", "full"),
    Case(2, 3, 4, 64, 7, 40, "float32", "random"),
    Case(1, 3, 16, 128, 65, 200, "float32", "late"),
    Case(3, 2, 8, 64, 130, 300, "float32", "lengths"),
    Case(1, 2, 16, 64, 70, 20, "float32", "dups"),
    Case(2, 2, 4, 64, 7, 10, "float32", "none"),
    Case(1, 2, 3, 64, 33, 50, "float32", "partial"),
    Case(1, 1, 16, 512, 64, 100, "float32", "full"),
    Case(2, 3, 4, 64, 7, 40, "bfloat16", "random"),
    Case(1, 3, 16, 64, 63, 200, "bfloat16", "full"),
    Case(2, 2, 16, 128, 130, 60, "bfloat16", "partial"),
    Case(1, 4, 16, 64, 200, 40, "bfloat16", "dups"),
    Case(2, 2, 4, 64, 130, 100, "bfloat16", "none"),
    Case(1, 2, 16, 512, 96, 300, "bfloat16", "random"),
    Case(3, 1, 8, 128, 100, 150, "bfloat16", "lengths"),
    Case(1, 2, 16, 64, 65, 200, "bfloat16", "late"),
]
_ids = lambda c: c.name


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_backward_is_autodiff_of_reference(case):
    q, kv, idx, sink, g = _inputs(case)
    got = _grads(q, kv, idx, sink, g, impl="reference")
    assert_close_to_autodiff(got, _grads(q, kv, idx, sink, g, impl="autodiff"), case.dtype, idx)
    if case.dtype == "bfloat16":
        assert_close_to_exact(got, exact_grads(q, kv, idx, sink, g))
    if case.fill == "none":  # no entry: o = 0 whatever q, kv, sink
        assert not any(np.asarray(x).any() for x in got)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gpu_kernel_backward(case, monkeypatch):
    """`implementation="pallas"` on CPU: the GPU forward and backward kernels, interpreted."""
    calls, kernel = [], pallas_gpu_bwd.sparse_attention_gpu_bwd
    monkeypatch.setattr(
        pallas_gpu_bwd,
        "sparse_attention_gpu_bwd",
        lambda *a, **k: (calls.append(1), kernel(*a, **k))[1],
    )
    q, kv, idx, sink, g = _inputs(case)
    with jax.numpy_rank_promotion("raise"):
        got = _grads(q, kv, idx, sink, g, impl="pallas")
    assert calls, "the backward kernel did not run"
    assert_kernel_matches(got, _grads(q, kv, idx, sink, g, impl="reference"), case.dtype)
    assert_close_to_autodiff(got, _grads(q, kv, idx, sink, g, impl="autodiff"), case.dtype, idx)


TPU_CASES = [  # the TPU interpreter is ~5x slower than the generic one: few, small cases
    Case(1, 2, 4, 64, 130, 50, "bfloat16", "partial"),  # two 128-row steps
    Case(1, 2, 16, 64, 65, 200, "float32", "late"),
    Case(1, 1, 4, 64, 140, 6, "float32", "dups"),  # repeats within and across steps
]


@pytest.mark.parametrize("case", TPU_CASES, ids=_ids)
def test_tpu_kernel_backward(case):
    """The Mosaic forward (its lse) and backward in the TPU interpreter, race detector on."""
    q, kv, idx, sink, g = _inputs(case)
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    fwd = functools.partial(pallas_tpu.sparse_attention_tpu, return_lse=True, interpret=params)
    bwd = functools.partial(pallas_tpu_bwd.sparse_attention_tpu_bwd, interpret=params)
    with jax.numpy_rank_promotion("raise"):
        o, lse = jax.jit(functools.partial(fwd, scale=_S))(q, kv, idx, sink)
        delta, dsink = backward_stats(o, g, sink, lse)
        dq, dkv = jax.jit(functools.partial(bwd, scale=_S))(q, kv, idx, lse, delta, g)
    _, want_lse = reference_forward(q, kv, idx, sink, scale=_S)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-5)  # |lse| < 20: ~10 fp32 ulps
    assert_kernel_matches(
        (dq, dkv, dsink), _grads(q, kv, idx, sink, g, impl="reference"), case.dtype
    )


@pytest.mark.parametrize(
    "blocks",
    [BackwardBlockSizes(rows=16, heads=16), BackwardBlockSizes(rows=64, heads=32)],
    ids=lambda b: f"r{b.rows}h{b.heads}",
)
def test_gpu_kernel_backward_tilings(blocks):
    """Other row and head blocks than the default: the same gradients (repeats straddle
    blocks differently; 20 heads pad to 32 or split into two head blocks)."""
    case = Case(1, 2, 20, 64, 70, 6, "bfloat16", "dups")
    q, kv, idx, sink, g = _inputs(case)
    o, lse = reference_forward(q, kv, idx, sink, scale=_S)
    delta, dsink = backward_stats(o, g, sink, lse)
    bwd = functools.partial(pallas_gpu_bwd.sparse_attention_gpu_bwd, scale=_S, interpret=True)
    dq, dkv = jax.jit(functools.partial(bwd, blocks=blocks))(q, kv, idx, lse, delta, g)
    want = sparse_attention_reference_bwd(q, kv, idx, lse, delta, g, scale=_S)
    assert_kernel_matches((dq, dkv, dsink), (*want, dsink), case.dtype)


@pytest.mark.parametrize(
    "case",
    [Case(2, 3, 4, 64, 130, 100, "float32", "late"), Case(1, 2, 16, 64, 7, 10, "float32", "none")],
    ids=_ids,
)
def test_gpu_forward_log_sum_exp(case):
    """The forward kernel's saved statistic; a query with no valid entry gets the sink."""
    q, kv, idx, sink, _ = _inputs(case)
    run = functools.partial(pallas_gpu.sparse_attention_gpu, interpret=True, return_lse=True)
    _, lse = jax.jit(functools.partial(run, scale=_S))(q, kv, idx, sink)
    _, want = reference_forward(q, kv, idx, sink, scale=_S)
    assert np.abs(want).max() < 32  # so 1e-5 is a few fp32 ulps
    np.testing.assert_allclose(lse, want, rtol=0, atol=1e-5)
    if case.fill == "none":
        np.testing.assert_allclose(lse, np.broadcast_to(sink, lse.shape), rtol=0, atol=2e-6)


def _add_rows(ids_ref, x_ref, _, o_ref):
    at = (ids_ref[...][:, None], jnp.arange(o_ref.shape[1], dtype=jnp.int32)[None, :])
    plt.atomic_add(o_ref, at, x_ref[...])


def test_interpreter_atomic_add_drops_repeated_addresses():
    """Why the interpreted GPU backward sums repeated rows itself (`pallas_gpu_bwd.py`): the
    generic interpreter's atomic add keeps one of several updates to the same address. If
    this starts failing, JAX fixed it and that workaround can go."""
    ids = jnp.array([0, 1, 1, 3], jnp.int32)
    out = pl.pallas_call(
        _add_rows,
        out_shape=jax.ShapeDtypeStruct((4, 8), jnp.float32),
        input_output_aliases={2: 0},
        interpret=True,
    )(ids, jnp.ones((4, 8), jnp.float32), jnp.zeros((4, 8), jnp.float32))
    assert np.asarray(out)[1, 0] == 1.0  # a GPU gives 2


def test_backward_block_sizes_errors():
    with pytest.raises(ValueError, match="rows=24"):
        BackwardBlockSizes(rows=24)
    with pytest.raises(ValueError, match="heads=8"):
        BackwardBlockSizes(heads=8)
    q, kv = (jax.ShapeDtypeStruct(s, jnp.float32) for s in [(1, 1, 4, 512), (1, 30000, 512)])
    with pytest.raises(ValueError, match="over DKV_VMEM_BUDGET"):
        pallas_tpu_bwd.sparse_attention_tpu_bwd(q, kv, None, None, None, None, scale=_S)


# V4 shapes: Flash (64 heads, window 128 + top-512), Pro (128 heads, + top-1024); head dim 512.
_V4 = [(64, 640), (128, 1152)]


def _abstract_bwd_inputs(h, k, b=2, n=4096):
    bf16, f32 = jnp.bfloat16, jnp.float32
    sd = jax.ShapeDtypeStruct
    q = sd((b, 1, h, 512), bf16)
    return (
        q,
        sd((b, n, 512), bf16),
        sd((b, 1, k), jnp.int32),
        sd((b, 1, h), f32),
        sd((b, 1, h), f32),
        q,
    )


def _lower_bwd_for_h100(h, k) -> str:
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    run = functools.partial(pallas_gpu_bwd.sparse_attention_gpu_bwd, scale=512**-0.5)
    with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jax 0.12 deprecates Pallas Triton
        lowered = (
            jax.jit(run).trace(*_abstract_bwd_inputs(h, k)).lower(lowering_platforms=("cuda",))
        )
    return lowered.as_text()


@pytest.mark.parametrize(("h", "k"), _V4)
def test_gpu_backward_lowers_to_triton_for_h100(h, k):
    assert "xla.gpu.triton" in _lower_bwd_for_h100(h, k)


def test_gpu_backward_compiles_for_sm90(tmp_path, monkeypatch):
    """The backward's Triton IR compiled on the host to sm_90 (the `triton` package, as in
    `test_sparse_attention_kernels.py`): its shared memory must fit an H100 program's 227 KB.
    Measured (triton 3.8, default 32 rows x 32 heads x 8 warps x 2 stages, D = 512):
    133,248 B shared; ptxas: 255 registers, 16 B of spills; mma.sync (M = 32 < wgmma's 64).
    64-row or 64-head blocks need 330-390 KB of shared memory and do not launch."""
    triton = pytest.importorskip("triton")
    from jax._src.pallas.triton import pallas_call_registration as registration
    from triton.backends.compiler import GPUTarget

    ir, lower = [], registration.lowering.lower_jaxpr_to_triton_module
    capture = lambda *a, **k: (r := lower(*a, **k), ir.append(r.module.operation.get_asm()))[0]
    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    _lower_bwd_for_h100(64, 640)
    (tmp_path / "bwd.ttir").write_text(ir[-1])
    blocks = gpu_backward_block_sizes(64, 512)
    opts = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    kernel = triton.compile(
        str(tmp_path / "bwd.ttir"), target=GPUTarget("cuda", 90, 32), options=opts
    )
    assert kernel.metadata.shared <= 227 * 1024
    assert "red.global.add.f32" in kernel.asm["ptx"] or "atom.global" in kernel.asm["ptx"]


@pytest.mark.parametrize(("h", "k"), _V4)
def test_tpu_backward_lowers_to_mosaic(h, k):
    run = functools.partial(pallas_tpu_bwd.sparse_attention_tpu_bwd, scale=512**-0.5)
    lowered = jax.jit(run).trace(*_abstract_bwd_inputs(h, k)).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="JAX_PLATFORMS=cuda pytest -m gpu")
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gpu_backward_compiled(case):
    """The compiled Triton backward on a GPU (fp32 atomics with masks and repeated rows, as
    the interpreter cannot run them) vs the reference backward on the same residuals."""
    q, kv, idx, sink, g = _inputs(case)
    o, lse = reference_forward(q, kv, idx, sink, scale=_S)
    delta, dsink = backward_stats(o, g, sink, lse)
    bwd = jax.jit(functools.partial(pallas_gpu_bwd.sparse_attention_gpu_bwd, scale=_S))
    want = sparse_attention_reference_bwd(q, kv, idx, lse, delta, g, scale=_S)
    assert_kernel_matches((*bwd(q, kv, idx, lse, delta, g), dsink), (*want, dsink), case.dtype)
