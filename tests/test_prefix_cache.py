"""Automatic prefix cache (v4jax.decode.prefix, prefix_store): exact restores, the failure
modes engines hit (stale sliding-window state, block sizes that never hit), and safe storage.

Exactness tolerance: a hit restores the cache a cold prefill wrote and prefills the rest as
a chunk continuing from the restore point, so it is chunked prefill; in float32 (bf16
numerics, dtype float32) chunked and one-shot prefill of the tiny model agree to ~1e-6 on
logits of magnitude ~1-10 (summation order of the attention pools differs), hence 2e-5."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax import config
from v4jax.decode.prefix import block_size, prefill_cached
from v4jax.decode.prefix_store import SUFFIX, decode_record, encode_record

TOL = 2e-5
MAX_LEN = 512
COLD_WIDTH = 320  # every prompt here is shorter


@pytest.fixture(scope="module")
def model():
    return v4jax.init(config.tiny(), seed=0, numerics="bf16", dtype=jnp.float32)


@pytest.fixture(scope="module")
def text():
    return np.random.default_rng(0).integers(1, config.tiny().vocab_size, 400).tolist()


def cold(model, prompts):
    """One-shot prefill of each prompt, right-padded to one width (one compilation)."""
    out = []
    for p in prompts:
        tokens = np.zeros((1, COLD_WIDTH), np.int32)
        tokens[0, : len(p)] = p
        logits, _ = model.prefill(tokens, model.init_cache(1, MAX_LEN), [len(p)])
        out.append(np.asarray(logits[0]))
    return np.stack(out)


def cached(model, prompts, pc):
    logits, cache = prefill_cached(model, prompts, model.init_cache(len(prompts), MAX_LEN), pc)
    return np.asarray(logits), cache


def files(path):
    return sorted(f for f in os.listdir(path) if f.endswith(SUFFIX))


def test_block_is_the_largest_ratio_not_more():
    # vllm-ascend #16270: an LCM of several group block sizes (4096) left 0% hits below it
    for cfg in (config.tiny(), config.flash(), config.pro()):
        assert block_size(cfg) == 128
    with pytest.raises(ValueError, match="multiple of every compression ratio"):
        block_size(config.tiny(), 64)


def test_hits_are_exact_batched_and_mixed(model, text, tmp_path):
    pc = v4jax.PrefixCache(tmp_path)
    a = text[:300]  # stores blocks 0, 1 (states at 128 and 256)
    _, _ = cached(model, [a], pc)
    assert pc.stats()["hit_tokens"] == 0 and pc.stats()["prefill_tokens"] == 300
    assert len(files(tmp_path)) == 2
    # one batch: a full repeat, a 1-block share, a miss, and a prompt ending on a block end
    prompts = [a, text[:200] + [7, 7], text[200:260], text[:256]]
    got, _ = cached(model, prompts, pc)
    np.testing.assert_allclose(got, cold(model, prompts), atol=TOL, rtol=0)
    s = pc.stats()
    # a: 256 (limit (300-1)//128 blocks); 2nd: 128; miss: 0; 4th: 128 (one token must be
    # prefilled for its logits, so at most (256-1)//128 = 1 block)
    assert s["hit_tokens"] == 256 + 128 + 0 + 128
    assert s["hit_tokens"] + s["prefill_tokens"] == 300 + sum(len(p) for p in prompts)


@pytest.mark.slow  # compiles generate's loop for two batch sizes plus the stream's step
def test_generate_greedy_identical(model, text, tmp_path):
    pc = v4jax.PrefixCache(tmp_path)
    prompts = [text[:290], text[:140] + [3]]
    plain = v4jax.generate(model, prompts, max_new_tokens=6, max_len=MAX_LEN)
    for _ in range(2):  # cold (stores), then warm (hits)
        g = v4jax.generate(model, prompts, max_new_tokens=6, max_len=MAX_LEN, prefix_cache=pc)
        np.testing.assert_array_equal(g.tokens, plain.tokens)
    assert pc.stats()["hit_tokens"] == 256 + 128
    stream = list(
        v4jax.generate_stream(model, prompts[0], max_new_tokens=6, max_len=MAX_LEN, prefix_cache=pc)
    )
    assert stream == plain.sequences()[0]
    # entries on disk are complete and readable by a fresh object (empty RAM tier)
    fresh = v4jax.PrefixCache(tmp_path)
    g = v4jax.generate(model, prompts, max_new_tokens=6, max_len=MAX_LEN, prefix_cache=fresh)
    np.testing.assert_array_equal(g.tokens, plain.tokens)
    assert fresh.stats()["disk_hits"] > 0 and fresh.stats()["hit_tokens"] == 256 + 128


def test_no_stale_window_state(model, text):
    # ROCm/ATOM #1417: a hit reused another request's sliding-window ring. With the state
    # checkpointed every 256 tokens only, a 300-token request stores block 0's entries but
    # its state only at 256; a request sharing 200 tokens matches block 0 and must not
    # resume there (no state at 128), nor with the ring of position 256.
    pc = v4jax.PrefixCache(window_every=256)
    cached(model, [text[:300]], pc)
    other = text[:200] + [11, 12, 13]
    got, _ = cached(model, [other], pc)
    assert pc.stats()["hit_tokens"] == 0
    np.testing.assert_allclose(got, cold(model, [other]), atol=TOL, rtol=0)
    got, _ = cached(model, [text[:270]], pc)  # shares the state at 256: a hit
    assert pc.stats()["hit_tokens"] == 256
    np.testing.assert_allclose(got, cold(model, [text[:270]]), atol=TOL, rtol=0)


def test_other_weights_never_hit(model, text):
    pc = v4jax.PrefixCache()
    cached(model, [text[:200]], pc)
    other = v4jax.init(config.tiny(), seed=1, numerics="bf16", dtype=jnp.float32)
    got, _ = cached(other, [text[:200]], pc)
    assert pc.stats()["hit_tokens"] == 0
    np.testing.assert_allclose(got, cold(other, [text[:200]]), atol=TOL, rtol=0)


def test_corrupt_truncated_foreign_entries_are_skipped(model, text, tmp_path):
    pc = v4jax.PrefixCache(tmp_path)
    cached(model, [text[:300]], pc)
    first, second = (tmp_path / f for f in files(tmp_path))
    for f, damage in ((first, "flip"), (second, "truncate")):
        blob = bytearray(f.read_bytes())
        if damage == "flip":
            blob[len(blob) // 2] ^= 0x40
        else:
            del blob[-100:]
        f.write_bytes(bytes(blob))
    fresh = v4jax.PrefixCache(tmp_path)
    got, _ = cached(model, [text[:300]], fresh)
    np.testing.assert_allclose(got, cold(model, [text[:300]]), atol=TOL, rtol=0)
    s = fresh.stats()
    assert s["hit_tokens"] == 0 and s["bad_records"] >= 1
    # the damaged records were replaced by intact ones
    for name in files(tmp_path):
        decode_record((tmp_path / name).read_bytes())
    # a foreign record (intact, wrong shapes) under a valid key is not used
    (tmp_path / files(tmp_path)[0]).write_bytes(encode_record([np.zeros((2, 3), np.float32)]))
    fresh = v4jax.PrefixCache(tmp_path)
    got, _ = cached(model, [text[:300]], fresh)
    np.testing.assert_allclose(got, cold(model, [text[:300]]), atol=TOL, rtol=0)
    assert fresh.stats()["bad_records"] == 1


def test_full_disk_leaves_cache_usable(model, text, tmp_path, monkeypatch):
    pc = v4jax.PrefixCache(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    got, _ = cached(model, [text[:300]], pc)
    monkeypatch.undo()
    assert pc.stats()["write_errors"] == 2 and files(tmp_path) == []
    assert not [f for f in os.listdir(tmp_path)], "temporary files left behind"
    got2, _ = cached(model, [text[:300]], pc)  # the RAM tier still serves
    assert pc.stats()["hit_tokens"] == 256
    np.testing.assert_allclose(got2, got, atol=TOL, rtol=0)


def test_lru_budgets(tmp_path):
    rec = [np.arange(1000, dtype=np.float32)]
    size = len(encode_record(rec))
    pc = v4jax.PrefixCache(tmp_path, ram_bytes=2 * size, disk_bytes=3 * size)
    for k in "abcd":
        pc.put(k * 64, rec)
        os.utime(tmp_path / f"{k * 64}{SUFFIX}", (0, {"a": 1, "b": 2, "c": 3, "d": 4}[k]))
    pc.put("e" * 64, rec)  # disk over budget: the oldest by mtime (a, then b) go
    assert files(tmp_path) == [f"{k * 64}{SUFFIX}" for k in "cde"]
    assert list(pc._ram) == ["d" * 64, "e" * 64]
    assert pc.get("a" * 64) is None
    np.testing.assert_array_equal(pc.get("c" * 64)[0], rec[0])  # from disk, promoted
    assert list(pc._ram) == ["e" * 64, "c" * 64]
    assert pc.stats()["evictions"] == 2 + 4  # disk a, b; RAM a, b, c, then d for c


def test_two_processes_never_see_half_records(tmp_path):
    """A writer process rewrites records of several MB under a few keys while this process
    reads them: every read is either a miss or an intact record, never a partial one."""
    writer = textwrap.dedent(f"""
        import numpy as np
        from v4jax.decode.prefix_store import PrefixCache
        pc = PrefixCache({str(tmp_path)!r}, ram_bytes=0)
        for i in range(60):
            a = np.full((1 << 20,), i, np.float32)
            pc.put("k%d" % (i % 3), [a, a[:10]], replace=True)
        print("done")
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    reader = v4jax.PrefixCache(tmp_path, ram_bytes=0)
    seen = 0
    while proc.poll() is None:
        for k in range(3):
            rec = reader.get(f"k{k}")
            if rec is not None:
                assert rec[0].shape == (1 << 20,) and (rec[0] == rec[0][0]).all()
                assert (rec[1] == rec[0][0]).all()
                seen += 1
    assert proc.stdout.read().strip() == "done" and proc.returncode == 0
    assert reader.stats()["bad_records"] == 0 and seen > 0
    assert not [f for f in os.listdir(tmp_path) if not f.endswith(SUFFIX)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="ram_bytes"):
        v4jax.PrefixCache(ram_bytes=-1)
    with pytest.raises(ValueError, match="window_every"):
        v4jax.PrefixCache(window_every=0)
    with pytest.raises(ValueError, match="decode record|not a prefix-cache record"):
        decode_record(b"garbage" * 10)
    # records are JSON + raw bytes: no pickle on the read path
    blob = encode_record([np.zeros(3, np.float32)])
    at = len(b"V4PC1\n") + 32
    n = int.from_bytes(blob[at : at + 8], "little")
    assert json.loads(blob[at + 8 : at + 8 + n]) == [["float32", [3]]]


# ---- compact layout (FP8 nope dims + rope dims), v4jax.decode.prefix_pack ----


def test_pack_is_lossless_on_fp8_simulated_rows_only():
    from ml_dtypes import bfloat16

    from v4jax.decode.prefix_pack import pack, unpack
    from v4jax.numerics.quant import fp8_quant_dequant

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 32, 512)) * np.exp(rng.uniform(-8, 8, (2, 32, 1)))).astype(
        np.float32
    )
    nope = np.asarray(fp8_quant_dequant(jnp.asarray(x[..., :448]), 64))
    sim = np.concatenate([nope, x[..., 448:]], -1).astype(bfloat16)  # as the reference caches
    plain = x.astype(bfloat16)  # "bf16" numerics: no FP8 simulation
    other = rng.standard_normal((2, 8, 4, 1024)).astype(np.float32)  # not a K = V row
    packed = pack([sim, plain, other], head_dim=512, rope_dim=64)
    assert packed[0].tolist() == [1, 0, 0]
    assert sum(a.nbytes for a in packed[1:4]) == 2 * 32 * (448 + 7 + 128)  # vs 1,024 B a row
    back = unpack(packed)
    for a, b in zip(back, [sim, plain, other], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    assert unpack([np.ones(2, np.uint8), sim]) == []  # malformed: discarded as foreign
    assert unpack([sim]) == [sim]  # a plain record


def test_compact_records_restore_bit_for_bit(text, tmp_path):
    """Reference numerics (the bundled checkpoint): a hit from compact records gives the same
    logits, bit for bit, as a hit from plain records and as the run that stored them."""
    ref = v4jax.load(
        os.path.join(os.path.dirname(__file__), "data", "v4-tiny-flash"), progress=False
    )
    prompt = text[:200]
    got = {}
    for compact in (False, True):
        pc = v4jax.PrefixCache(tmp_path / str(compact), compact=compact)
        stored, _ = cached(ref, [prompt], pc)
        warm, _ = cached(ref, [prompt], v4jax.PrefixCache(tmp_path / str(compact)))  # disk
        np.testing.assert_array_equal(warm, stored)
        got[compact] = (warm, pc.stats()["stored_bytes"])
    np.testing.assert_array_equal(got[True][0], got[False][0])
    # packed: the window rows and compressed entries (128 wide here: 64 + 1 + 128 of 256 B a
    # row); kept: the indexer keys (FP4-simulated, not FP8) and the float32 compressor rows,
    # which at this size are a large share (measured 0.88 of the plain bytes)
    assert got[True][1] < 0.9 * got[False][1]
