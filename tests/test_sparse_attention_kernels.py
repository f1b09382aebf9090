"""Sparse-attention kernels == the jnp reference (`v4jax/kernels/sparse_attention/`).

On CPU the kernels run in Pallas' interpreters: the GPU (Triton) kernel in the generic one,
the TPU (Mosaic) kernel in the TPU one, which simulates its DMAs and semaphores and detects
races (about 100x slower, so it gets a few cases). Both interpreters fill output buffers with
NaN before the kernel runs (checked below), so a finite output proves every element was
written; on a GPU (`-m gpu`) the compiled kernel starts from a NaN-filled buffer. Without the
hardware, the rest is checked at compile level: Pallas -> Triton IR for an abstract H100,
Triton IR -> sm_90 code (the `triton` package), Pallas -> Mosaic for TPU.

Tolerances. The kernels run the reference's algorithm (fp32 scores, online softmax over 64-entry
blocks, probabilities rounded to the query dtype before P.V, fp32 accumulation) and differ from
it only in fp32 summation order (the accumulator is rescaled per block instead of each block
being weighted by one factor; the dot products are blocked differently).
- float32: |kernel - reference| <= 2e-6 x max|reference| (a few fp32 ulps of the output scale).
  Measured over this matrix: at most 9.4e-7 x max|reference|.
- bfloat16: each element within 1 bf16 ulp of itself, plus 2^-14 (6.1e-5) x max|reference|,
  and at most 0.5% of the elements differing at all. The extra term: a score that differs in
  its last fp32 bit can round its probability to the neighbouring bf16 value (a 2^-8 relative
  change of one weight); on a small element (cancellation) that exceeds the element's own ulp.
  Measured: beyond 1 ulp by at most 1.2e-5 x max|reference|, at most 0.073% of the elements
  differ. Mutations the bounds must catch (probed once with the reference itself): softmax
  blocks of 32 or 128 instead of 64 change 1.2-8% of the elements and exceed 1 ulp by
  1.2e-4 to 5.3e-4 x max|reference|; probabilities not rounded to bf16 change 12-26%.
Inputs are drawn fresh for every case from a seed derived from its name.
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

from v4jax.kernels import sparse_attention as sa
from v4jax.kernels.sparse_attention import pallas_gpu, pallas_tpu, sparse_attention
from v4jax.kernels.sparse_attention.reference import sparse_attention_reference


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    s: int
    h: int
    d: int
    k: int  # index-list length
    n: int  # pool rows
    dtype: str
    fill: str  # full | random | partial | lengths | late | none

    @property
    def name(self) -> str:
        return f"b{self.b}s{self.s}h{self.h}d{self.d}k{self.k}n{self.n}-{self.dtype}-{self.fill}"


def _indices(rng, c: Case) -> np.ndarray:
    """[B, S, K] rows of the pool; which entries are -1 depends on `fill`."""
    idx = rng.integers(0, c.n, (c.b, c.s, c.k))
    pos = np.arange(c.k)
    if c.fill == "random":  # scattered holes
        keep = rng.random(idx.shape) > 0.3
    elif c.fill == "partial":  # a window filled up to a per-query count, -1 after it
        keep = pos < rng.integers(0, c.k + 1, (c.b, c.s, 1))
    elif c.fill == "lengths":  # sequences of different valid lengths in one batch
        lengths = np.maximum(1, (c.k * np.arange(c.b, 0, -1)) // c.b)
        keep = pos < lengths[:, None, None]
    elif c.fill == "late":  # a first block with no valid entry, then valid ones
        keep = np.broadcast_to(pos >= min(64, c.k - 1), idx.shape)
    elif c.fill == "none":
        keep = np.zeros(idx.shape, bool)
    else:
        keep = np.ones(idx.shape, bool)
    return np.where(keep, idx, -1).astype(np.int32)


def _inputs(c: Case):
    rng = np.random.default_rng(zlib.crc32(c.name.encode()))
    dt = jnp.dtype(c.dtype)
    q = jnp.asarray(2.0 * rng.standard_normal((c.b, c.s, c.h, c.d)), dt)  # peaky softmaxes
    kv = jnp.asarray(rng.standard_normal((c.b, c.n, c.d)), dt)
    sink = jnp.asarray(2.0 * rng.standard_normal(c.h), jnp.float32)
    return q, kv, jnp.asarray(_indices(rng, c)), sink


def assert_matches(out, ref, dtype) -> None:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output elements"
    diff = np.abs(out - ref)
    if jnp.dtype(dtype) == jnp.float32:
        assert diff.max() <= 2e-6 * max(np.abs(ref).max(), 1e-30), diff.max()
        return
    scale = np.abs(ref).max()
    mag = np.maximum(np.maximum(np.abs(out), np.abs(ref)), np.finfo(np.float32).tiny)
    ulp = np.exp2(np.floor(np.log2(mag)) - 7)  # bf16: 8 significant bits
    assert (diff <= ulp + 2.0**-14 * scale).all(), (np.maximum(diff - ulp, 0) / scale).max()
    assert (diff > 0).mean() <= 0.005, (diff > 0).mean()


def _reference(q, kv, idx, sink):
    return jax.jit(functools.partial(sparse_attention_reference, scale=_S))(q, kv, idx, sink)


_S = 0.125  # softmax scale (V4: 512 ** -0.5; any value exercises the same code)

GPU_CASES = [
    Case(2, 3, 4, 64, 1, 16, "float32", "full"),
    Case(2, 3, 4, 64, 7, 40, "bfloat16", "random"),
    Case(1, 4, 16, 128, 7, 40, "float32", "partial"),
    Case(1, 3, 16, 64, 63, 200, "bfloat16", "full"),
    Case(1, 3, 16, 64, 64, 200, "float32", "full"),
    Case(1, 3, 16, 64, 65, 200, "bfloat16", "full"),
    Case(1, 3, 4, 64, 65, 200, "float32", "late"),
    Case(2, 4, 64, 64, 130, 300, "bfloat16", "partial"),
    Case(3, 2, 8, 128, 130, 300, "float32", "lengths"),
    Case(1, 2, 32, 64, 1024, 2048, "bfloat16", "random"),
    Case(3, 1, 16, 128, 1024, 1500, "bfloat16", "lengths"),
    Case(2, 3, 4, 64, 130, 100, "bfloat16", "none"),
    Case(1, 2, 16, 64, 7, 10, "float32", "none"),
    Case(1, 2, 128, 64, 130, 300, "float32", "random"),
    Case(1, 2, 128, 128, 200, 400, "bfloat16", "late"),
    Case(2, 1, 64, 512, 640, 3000, "bfloat16", "partial"),  # Flash decode: window + top-512
    Case(1, 1, 128, 512, 1152, 3000, "bfloat16", "random"),  # Pro decode: window + top-1024
    Case(1, 2, 64, 512, 64, 200, "float32", "full"),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_gpu_kernel_matches_reference(case):
    q, kv, idx, sink = _inputs(case)
    ref = _reference(q, kv, idx, sink)
    run = functools.partial(sparse_attention, scale=_S, implementation="pallas", interpret=True)
    with jax.numpy_rank_promotion("raise"):  # kernels broadcast explicitly (the reference not)
        out = jax.jit(run)(q, kv, idx, sink)
    assert_matches(out, ref, case.dtype)
    if case.fill == "none":
        assert not np.asarray(out, np.float32).any()  # no entry: 0, the sink carries no value


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="JAX_PLATFORMS=cuda pytest -m gpu")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_gpu_kernel_compiled_matches_reference(case):
    """The compiled Triton kernel on a real GPU, from a NaN-filled output buffer."""
    q, kv, idx, sink = _inputs(case)
    run = functools.partial(pallas_gpu.sparse_attention_gpu, scale=_S, poison=True)
    assert_matches(jax.jit(run)(q, kv, idx, sink), _reference(q, kv, idx, sink), case.dtype)


def test_poisoned_output_buffer_reaches_the_kernel():
    """`poison=True` really starts from NaN: a kernel that skipped its store would fail."""
    q, kv, idx, sink = _inputs(Case(1, 2, 4, 64, 7, 10, "bfloat16", "full"))
    out = pallas_gpu.sparse_attention_gpu(q, kv, idx, sink, scale=_S, interpret=True, poison=True)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    with pytest.MonkeyPatch.context() as mp:  # a kernel that writes nothing
        mp.setattr(pallas_gpu, "_kernel", lambda *refs, **kw: None)
        out = pallas_gpu.sparse_attention_gpu(
            q, kv, idx, sink, scale=_S, interpret=True, poison=True
        )
    assert np.isnan(np.asarray(out, np.float32)).all()


TPU_CASES = [
    Case(2, 2, 4, 64, 130, 200, "bfloat16", "partial"),
    Case(1, 2, 16, 64, 65, 200, "float32", "late"),
    Case(1, 2, 4, 64, 7, 50, "bfloat16", "none"),
]


@pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: c.name)
def test_tpu_kernel_matches_reference(case):
    q, kv, idx, sink = _inputs(case)
    ref = _reference(q, kv, idx, sink)
    # Race detector on (raises on a race, e.g. a DMA landing in the slot being read); DMAs
    # complete when issued, so one started too early would also show in the output.
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    run = functools.partial(pallas_tpu.sparse_attention_tpu, scale=_S, interpret=params)
    with jax.numpy_rank_promotion("raise"):
        out = jax.jit(run)(q, kv, idx, sink)
    assert_matches(out, ref, case.dtype)


def _write_half(x_ref, o_ref):
    o_ref[:4] = x_ref[:4]


@pytest.mark.parametrize("interpret", [True, pltpu.InterpretParams()], ids=["generic", "tpu"])
def test_interpreters_poison_unwritten_outputs(interpret):
    """What makes `np.isfinite(out).all()` above a check that every element was written."""
    out = pl.pallas_call(
        _write_half, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=interpret
    )(jnp.ones((8, 128), jnp.float32))
    assert (np.asarray(out[:4]) == 1).all() and np.isnan(np.asarray(out[4:])).all()


def test_kernel_gradient_is_the_reference_gradient():
    q, kv, idx, sink = _inputs(Case(1, 3, 4, 64, 70, 100, "float32", "random"))

    def loss(impl, q, kv, sink):
        o = sparse_attention(q, kv, idx, sink, scale=_S, implementation=impl, interpret=True)
        return jnp.sum(jnp.sin(o))

    want = jax.jit(jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2)))(q, kv, sink)
    got = jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2)))(q, kv, sink)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_dispatch():
    assert sa.resolve_implementation("auto", "cpu") == "reference"
    assert sa.resolve_implementation("auto", "gpu") == "pallas"
    assert sa.resolve_implementation("auto", "tpu") == "pallas"
    assert sa.resolve_implementation("pallas", "cpu") == "pallas"
    with pytest.raises(ValueError, match="implementation='triton'"):
        sa.resolve_implementation("triton")
    q, kv, idx, sink = _inputs(Case(1, 2, 4, 64, 7, 10, "float32", "full"))
    with pytest.raises(ValueError, match="shapes disagree"):
        sparse_attention(q, kv[:, :, :32], idx, sink, scale=_S)
    with pytest.raises(ValueError, match="idx must be integer"):
        sparse_attention(q, kv, idx.astype(jnp.float32), sink, scale=_S)


# V4 decode shapes: Flash (64 heads, window 128 + top-512), Pro (128 heads, + top-1024).
_V4 = [(64, 640), (128, 1152)]


def _abstract_inputs(h, k, b=2):
    return (
        jax.ShapeDtypeStruct((b, 1, h, 512), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, 4096, 512), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, 1, k), jnp.int32),
        jax.ShapeDtypeStruct((h,), jnp.float32),
    )


def _lower_for_h100(h, k, b=2) -> str:
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    run = functools.partial(pallas_gpu.sparse_attention_gpu, scale=512**-0.5)
    with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jax 0.12 deprecates Pallas Triton
        lowered = jax.jit(run).trace(*_abstract_inputs(h, k, b)).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


@pytest.mark.parametrize(("h", "k"), _V4)
def test_gpu_kernel_lowers_to_triton_for_h100(h, k):
    """The Pallas -> Triton IR lowering runs on the host for an abstract H100."""
    assert "xla.gpu.triton" in _lower_for_h100(h, k)


def test_gpu_kernel_compiles_for_sm90(tmp_path, monkeypatch):
    """The kernel's Triton IR, compiled on the host to sm_90 code by the `triton` package (it
    comes with torch, a test dependency): it must fit the 227 KB of shared memory an H100
    program may use, and its products must be Hopper wgmma. A proxy: on the GPU, XLA compiles
    the same IR with its own Triton build. Measured (triton 3.8, Pro shape, 64 heads x 8 warps
    x 2 stages): 196,864 B of shared memory; ptxas: 255 registers, 552 B of spills."""
    triton = pytest.importorskip("triton")
    from jax._src.pallas.triton import pallas_call_registration as registration
    from triton.backends.compiler import GPUTarget

    from v4jax.kernels.sparse_attention.blocks import gpu_block_sizes

    ir, lower = [], registration.lowering.lower_jaxpr_to_triton_module
    capture = lambda *a, **k: (r := lower(*a, **k), ir.append(r.module.operation.get_asm()))[0]
    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    _lower_for_h100(128, 1152, b=3)
    (tmp_path / "kernel.ttir").write_text(ir[-1])
    blocks = gpu_block_sizes(128, 512)
    opts = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    kernel = triton.compile(
        str(tmp_path / "kernel.ttir"), target=GPUTarget("cuda", 90, 32), options=opts
    )
    assert kernel.metadata.shared <= 227 * 1024
    assert "wgmma.mma_async" in kernel.asm["ptx"]


@pytest.mark.parametrize(("h", "k"), _V4)
def test_tpu_kernel_lowers_to_mosaic(h, k):
    """Pallas -> Mosaic lowering (block-shape rules, memory spaces); Mosaic's own layout passes
    run in the TPU compiler and are not covered."""
    run = functools.partial(pallas_tpu.sparse_attention_tpu, scale=512**-0.5)
    lowered = jax.jit(run).trace(*_abstract_inputs(h, k)).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


def test_model_logits_with_kernels(ref_model, golden, fixture_dir, monkeypatch):
    """`kernels="pallas"` (the GPU kernel, interpreted) gives the reference's logits on the
    fixture's 37-token prompt. Measured: bit-identical. Bound: the fixture README's noise
    probes for correct summation-order variants at this length (0.038-0.046 max abs), since
    FP8 activation rounding turns a one-ulp attention difference into e4m3 steps downstream."""
    import v4jax

    calls, kernel = [], pallas_gpu.sparse_attention_gpu
    counted = lambda *a, **k: (calls.append(1), kernel(*a, **k))[1]
    monkeypatch.setattr(pallas_gpu, "sparse_attention_gpu", counted)
    model = v4jax.load(fixture_dir, numerics="reference", kernels="pallas", progress=False)
    tokens = golden["p037_tokens"][None]
    got = np.asarray(model.logits(tokens))
    assert calls, "the model did not call the Pallas kernel"
    want = np.asarray(ref_model.logits(tokens))
    assert np.abs(got - want).max() <= 0.05
    assert (got.argmax(-1) == want.argmax(-1)).all()
