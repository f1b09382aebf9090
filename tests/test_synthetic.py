"""Tests of v4jax.checkpoint.synthetic: release inventory, FP8/FP4 quantisers, random weights."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from v4jax.checkpoint.safetensors import ShardedCheckpoint
from v4jax.checkpoint.synthetic import (
    dequantize_fp4,
    dequantize_fp8_blocks,
    iter_random_release_tensors,
    quantize_fp4_rows,
    quantize_fp8_blocks,
    random_release_tensors,
    release_tensor_specs,
    write_release_checkpoint,
)
from v4jax.config import flash, from_json, pro, tiny

FIXTURE = Path("/work/shared/fixtures/v4-tiny-flash")
E4M3 = ml_dtypes.float8_e4m3fn


def _fixture_specs() -> dict[str, tuple[str, tuple[int, ...]]]:
    with ShardedCheckpoint(FIXTURE) as ck:
        return {k: (ck.info(k).dtype, ck.info(k).shape) for k in ck.keys()}


# ----------------------------------------------------------------------------- inventory


def test_specs_match_fixture_exactly() -> None:
    fx = _fixture_specs()
    specs = release_tensor_specs(from_json(FIXTURE))
    assert set(specs) == set(fx)
    assert {k: specs[k] for k in fx} == fx
    assert release_tensor_specs(tiny()) == specs


def test_specs_full_size_spot_checks() -> None:
    """Release tensor shapes of Flash (computed from the config only, nothing allocated)."""
    f = release_tensor_specs(flash())
    assert f["layers.0.attn.wo_a.weight"] == ("F8_E4M3", (8192, 4096))
    assert f["layers.0.attn.wo_a.scale"] == ("F8_E8M0", (64, 32))
    assert f["layers.0.attn.wq_b.scale"] == ("F8_E8M0", (256, 8))
    assert f["layers.2.attn.compressor.wkv.weight"] == ("BF16", (1024, 4096))
    assert f["layers.3.attn.compressor.ape"] == ("F32", (128, 512))
    assert f["layers.2.attn.indexer.compressor.ape"] == ("F32", (4, 256))
    assert f["layers.2.attn.indexer.wq_b.weight"] == ("F8_E4M3", (8192, 1024))
    assert f["layers.5.ffn.experts.255.w2.weight"] == ("I8", (4096, 1024))
    assert f["layers.5.ffn.experts.255.w2.scale"] == ("F8_E8M0", (4096, 64))
    assert f["layers.2.ffn.gate.tid2eid"] == ("I64", (129280, 6))
    assert "layers.3.ffn.gate.tid2eid" not in f and "layers.2.ffn.gate.bias" not in f
    assert f["mtp.0.ffn.gate.bias"] == ("F32", (256,))
    assert f["mtp.0.e_proj.scale"] == ("F8_E8M0", (32, 32))
    assert f["hc_head_fn"] == ("F32", (4, 16384)) == f["mtp.0.hc_head_fn"]
    assert not any(k.startswith(("layers.0.attn.compressor", "mtp.0.attn.compressor")) for k in f)
    assert not any(".indexer." in k for k in f if k.startswith("layers.3."))
    p = release_tensor_specs(pro())
    assert p["layers.0.attn.compressor.wkv.weight"] == ("BF16", (512, 7168))
    assert p["layers.9.ffn.experts.383.w1.weight"] == ("I8", (3072, 3584))
    assert p["layers.9.ffn.experts.383.w1.scale"] == ("F8_E8M0", (3072, 224))
    assert p["mtp.0.hc_head_fn"] == ("F32", (4, 28672))


def test_specs_variants() -> None:
    s = release_tensor_specs(tiny(expert_dtype="fp8"))
    assert s["layers.0.ffn.experts.3.w2.weight"] == ("F8_E4M3", (256, 128))
    assert s["layers.0.ffn.experts.3.w2.scale"] == ("F8_E8M0", (2, 1))
    s = release_tensor_specs(tiny(compress_ratios=(0, 4, 128, 4), num_layers=4, num_mtp_layers=0))
    assert not any(k.startswith("mtp.") for k in s)
    s = release_tensor_specs(tiny(num_hash_layers=0))
    assert not any(k.endswith("tid2eid") for k in s) and "layers.0.ffn.gate.bias" in s


# ----------------------------------------------------------------------------- quantisers


def _grid_fp8(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random e4m3 values times a random power of two per 128x128 block (one block zero)."""
    bits = rng.integers(0, 256, shape, dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0  # no NaN
    v = bits.view(E4M3).astype(np.float32)
    e = rng.integers(-12, 6, (-(-shape[0] // 128), -(-shape[1] // 128)))
    v *= np.exp2(np.repeat(np.repeat(e, 128, 0), 128, 1)[: shape[0], : shape[1]])
    v[:128, 128:256] = 0
    return v


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (5, 1)])
def test_fp8_roundtrip_exact_on_grid(shape: tuple[int, int]) -> None:
    w = _grid_fp8(np.random.default_rng(0), shape)
    q, s = quantize_fp8_blocks(w)
    assert q.dtype == E4M3 and s.dtype == ml_dtypes.float8_e8m0fnu
    assert q.shape == shape and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    np.testing.assert_array_equal(dequantize_fp8_blocks(q, s), w)
    np.testing.assert_array_equal(dequantize_fp8_blocks(q, s.view(np.uint8)), w)


def test_fp8_scale_rule_and_rne() -> None:
    w = np.zeros((256, 384), np.float32)
    w[0, 0] = 448.0  # block (0,0): amax 448 -> scale 1
    w[0, 1:4] = [1.0625, 1.1875, -1.0625]  # ties between e4m3 neighbours (step 1/8 in [1, 2))
    w[0, 128] = 448.0 * 2.0**-5 * (1 + 2**-20)  # just above 448 * 2^-5 -> scale 2^-4
    w[200, 300] = 3.0 * 2.0**-130  # tiny amax -> clamped to the smallest scale 2^-127
    q, s = quantize_fp8_blocks(w)
    np.testing.assert_array_equal(s.view(np.uint8), [[127, 123, 0], [0, 0, 0]])
    np.testing.assert_array_equal(q[0, :4].astype(np.float32), [448.0, 1.0, 1.25, -1.0])
    assert s.view(np.uint8)[1, 1] == 0  # zero block -> smallest valid scale (E8M0 byte 0)
    r = np.random.default_rng(1).standard_normal((130, 260)).astype(np.float32)
    q, s = quantize_fp8_blocks(r)
    sc = np.repeat(np.repeat(s.astype(np.float32), 128, 0), 128, 1)[:130, :260]
    np.testing.assert_array_equal(q.view(np.uint8), (r / sc).astype(E4M3).view(np.uint8))
    amax = np.abs(np.pad(r, ((0, 126), (0, 124)))).reshape(2, 128, 3, 128).max((1, 3))
    assert np.all(amax / s.astype(np.float32) <= 448) and np.all(amax / s.astype(np.float32) > 224)


def test_fp4_roundtrip_exact_on_grid() -> None:
    rng = np.random.default_rng(2)
    vals = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    w = vals[rng.integers(0, 16, (64, 256))] * np.exp2(
        rng.integers(-20, 4, (64, 256 // 32))
    ).repeat(32, 1)
    w[3, :32] = 0.0
    packed, s = quantize_fp4_rows(w)
    assert packed.dtype == np.int8 and packed.shape == (64, 128) and s.shape == (64, 8)
    np.testing.assert_array_equal(dequantize_fp4(packed, s), w)


def test_fp4_rne_ties_nibbles_and_sign() -> None:
    w = np.zeros((2, 64), np.float32)
    w[0, :12] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, -0.25, -0.75, -5, 0]  # scale 1
    w[0, 32:36] = [9, -7, 0.5, 1]  # amax 9 -> scale 2^ceil(log2(1.5)) = 2; -7/2 is a tie
    packed, s = quantize_fp4_rows(w)
    got = dequantize_fp4(packed, s)
    np.testing.assert_array_equal(got[0, :12], [0, 1, 1, 2, 2, 4, 4, 6, 0, -1, -4, 0])
    np.testing.assert_array_equal(got[0, 32:36], [8, -8, 0, 1])
    assert s.view(np.uint8)[0].tolist() == [127, 128] and not got[1].any()
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [0.5, 1.0, 6.0, -0.5]
    packed, s = quantize_fp4_rows(w)
    assert packed.view(np.uint8)[0, :2].tolist() == [0x21, 0x97]  # low nibble = even element
    assert s.view(np.uint8).tolist() == [[127]]
    minus0 = dequantize_fp4(
        np.full((1, 16), 0x88, np.uint8).view(np.int8), np.array([[127]], np.uint8)
    )
    assert not np.signbit(minus0).any() and not minus0.any()  # code 8 (-0) reads as +0
    r = np.random.default_rng(3).standard_normal((16, 128)).astype(np.float32)
    packed, s = quantize_fp4_rows(r)
    sc = np.repeat(s.astype(np.float32), 32, 1)
    ref = (np.clip(r / sc, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)) * sc
    np.testing.assert_array_equal(dequantize_fp4(packed, s), ref)


# ----------------------------------------------------------------------------- magnitudes


def _check_magnitudes(get: Callable[[str], np.ndarray], names: list[str]) -> None:
    """Quantised tensors dequantise to finite values with the README recipe's magnitudes."""
    for name in (
        n for n in names if n.endswith(".weight") and n.replace("weight", "scale") in names
    ):
        q, s = get(name), get(name.replace(".weight", ".scale"))
        w = dequantize_fp4(q, s) if q.dtype == np.int8 else dequantize_fp8_blocks(q, s)
        assert np.isfinite(w).all(), name
        rows = np.linalg.norm(w, axis=1)
        lo, hi = (0.008, 0.05) if name.endswith(("wo_b.weight", "w2.weight")) else (0.02, 0.12)
        assert lo < np.median(w.std(axis=1)) < hi, name
        if "experts" in name and not name.endswith("w2.weight"):  # one clamp row of norm ~40
            clamp = 0 if name.endswith("w3.weight") else 1
            assert 20 < rows[clamp] < 80 and np.delete(rows, clamp).max() < 5, name


def test_fixture_tensors_dequantize_sensibly() -> None:
    with ShardedCheckpoint(FIXTURE) as ck:
        _check_magnitudes(ck.get, ck.keys())


# ----------------------------------------------------------------------------- random weights


def test_random_tensors_match_specs_and_recipe() -> None:
    cfg = tiny()
    t0 = time.perf_counter()
    t = random_release_tensors(cfg, seed=0)
    assert time.perf_counter() - t0 < 1.0
    specs = release_tensor_specs(cfg)
    assert list(t) == list(specs)
    for name, (dtype, shape) in specs.items():
        assert (str(t[name].dtype), t[name].shape) == (
            {
                "F8_E4M3": "float8_e4m3fn",
                "F8_E8M0": "float8_e8m0fnu",
                "I8": "int8",
                "BF16": "bfloat16",
                "F32": "float32",
                "I64": "int64",
            }[dtype],
            shape,
        ), name
    _check_magnitudes(t.__getitem__, list(t))
    tid = t["layers.1.ffn.gate.tid2eid"]
    assert tid.min() >= 0 and tid.max() < cfg.num_experts
    assert (np.sort(tid, 1)[:, 1:] != np.sort(tid, 1)[:, :-1]).all()  # distinct per row
    assert np.bincount(tid.ravel(), minlength=8).min() > 150  # roughly uniform (256 expected)
    hs = t["layers.0.hc_attn_scale"]
    assert ((hs >= 0.5) & (hs <= 1.5)).all()
    assert abs(t["embed.weight"].astype(np.float32).std() - 1.0) < 0.02
    assert abs(t["layers.2.attn_norm.weight"].astype(np.float32).mean() - 1.0) < 0.03
    assert len(np.unique(t["layers.0.attn.wq_a.scale"].view(np.uint8))) > 1  # blocks differ


def test_random_tensors_deterministic_and_seeded() -> None:
    cfg = tiny()
    a, b = random_release_tensors(cfg, 7), dict(iter_random_release_tensors(cfg, 7))
    c = random_release_tensors(cfg, 8)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert all(a[k].tobytes() != c[k].tobytes() for k in a if a[k].size > 64)
    # per-tensor seeding: a tensor shared by two configs is the same in both
    d = random_release_tensors(tiny(compress_ratios=(0, 4, 0)), 7)
    assert d["layers.0.attn.wq_a.weight"].tobytes() == a["layers.0.attn.wq_a.weight"].tobytes()


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_write_release_checkpoint_layout(tmp_path: Path, shards: int) -> None:
    cfg = tiny(compress_ratios=(4, 128, 0, 4, 128, 0), num_hash_layers=1, index_topk=2)
    folder = write_release_checkpoint(cfg, tmp_path / "ck", seed=3, shards=shards)
    assert from_json(folder) == cfg
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    wm = index["weight_map"]
    assert wm["embed.weight"] == files[0] and wm["layers.0.attn.wq_a.weight"] == files[0]
    assert {wm[k] for k in wm if k.startswith(("mtp.", "head.", "hc_head"))} == {files[-1]}
    assert wm[f"layers.{cfg.num_layers - 1}.attn.wq_a.weight"] == files[-1]
    ref = random_release_tensors(cfg, 3)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in ref.values())
    with ShardedCheckpoint(folder) as ck:
        assert set(ck.keys()) == set(ref)
        for k, v in ref.items():
            assert ck.get(k).dtype == v.dtype and ck.get(k).tobytes() == v.tobytes(), k


def test_write_release_checkpoint_rejects_bad_shards(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shards"):
        write_release_checkpoint(tiny(), tmp_path, seed=0, shards=5)


def test_write_release_checkpoint_matches_fixture_layout(tmp_path: Path) -> None:
    folder = write_release_checkpoint(tiny(), tmp_path, seed=0)
    ours = json.loads((folder / "model.safetensors.index.json").read_text())
    theirs = json.loads((FIXTURE / "model.safetensors.index.json").read_text())
    assert ours == theirs  # same weight_map (shard of every tensor) and total_size
