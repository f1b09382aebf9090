"""Tests of the torch-free safetensors reader/writer (v4jax.checkpoint.safetensors)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from v4jax.checkpoint.errors import CheckpointError
from v4jax.checkpoint.safetensors import (
    INDEX_FILE,
    SafetensorsFile,
    ShardedCheckpoint,
    StreamedTensor,
    TensorInfo,
    dtype_name,
    numpy_dtype,
    write_index,
    write_safetensors,
    write_safetensors_streamed,
)

FIXTURE = Path("/work/shared/fixtures/v4-tiny-flash")
SHARD1 = "model-00001-of-00002.safetensors"
ALL_DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "U16",
    "U32",
    "U64",
]
SHAPES = [(3, 5), (), (0, 4), (7,), (2, 3, 4)]


def _raw_bytes(a) -> bytes:
    """Bytes of a numpy array or torch tensor, C order."""
    if hasattr(a, "numpy"):  # torch tensor
        import torch

        return a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(a).tobytes()


def _random_tensors(seed: int = 0, dtypes: list[str] = ALL_DTYPES) -> dict[str, np.ndarray]:
    """Random bit patterns (NaNs included) of every dtype, in varied shapes."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(dtypes):
        dt, shape = numpy_dtype(name), SHAPES[i % len(SHAPES)]
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
        if name == "BOOL":
            raw &= 1
        out[f"t{i:02d}.{name.lower()}"] = raw.view(dt).reshape(shape)
    return out


def _write_raw(path: Path, header: dict | bytes, data: bytes = b"", n: int | None = None) -> Path:
    """A safetensors-like file with an arbitrary header (and header length)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


def _copy_fixture(dst: Path) -> Path:
    dst.mkdir()
    for name in (INDEX_FILE, SHARD1, "model-00002-of-00002.safetensors"):
        shutil.copy(FIXTURE / name, dst / name)
        (dst / name).chmod(0o644)
    return dst


def _raises(match: str, fn, *args):
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------ helpers and round trips


def test_dtype_helpers():
    for name in ALL_DTYPES:
        assert dtype_name(numpy_dtype(name)) == name
    assert dtype_name(np.dtype(">f4")) == "F32"
    _raises("unknown safetensors dtype 'F4'", numpy_dtype, "F4")
    _raises("no safetensors equivalent", dtype_name, np.dtype(np.complex64))


def test_round_trip_every_dtype(tmp_path):
    tensors = _random_tensors()
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "np", "k": "v"})
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "np", "k": "v"}
        assert sorted(f.keys()) == sorted(tensors)
        starts = [f.offset(k) for k in sorted(tensors)]
        assert starts == sorted(starts)  # data laid out in sorted-name order
        for name, ref in tensors.items():
            got = f.get(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert _raw_bytes(got) == _raw_bytes(ref)
            assert f.info(name) == TensorInfo(dtype_name(ref.dtype), ref.shape, ref.nbytes)


def test_get_is_readonly_view_that_outlives_close(tmp_path):
    path = tmp_path / "x.safetensors"
    ref = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(path, {"a": ref})
    f = SafetensorsFile(path)
    a = f.get("a")
    f.close()
    assert not a.flags.writeable and not a.flags.owndata
    np.testing.assert_array_equal(a, ref)
    _raises("x.safetensors: tensor 'a': file is closed", f.get, "a")
    _raises("tensor 'b' not in this file", f.info, "b")


def test_writer_handles_noncontiguous_and_big_endian(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"t": base.T, "s": base[::2, 1::2], "be": base.astype(">i4")}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        for name, ref in tensors.items():
            np.testing.assert_array_equal(f.get(name), ref)
        assert f.info("be").dtype == "I32"
    assert not (tmp_path / "x.safetensors.tmp").exists()
    _raises("tensor 'c'.*complex64", write_safetensors, tmp_path / "y", {"c": np.zeros(2, "c8")})


# ------------------------------------------------------------------ streaming and row reads


def _streamed(name: str, a: np.ndarray, rows: int) -> StreamedTensor:
    """`a` as a streamed tensor, `rows` rows per piece."""
    pieces = lambda: (a[i : i + rows] for i in range(0, max(len(a), 1), rows))  # noqa: E731
    return StreamedTensor(name, dtype_name(a.dtype), a.shape, pieces)


def test_streamed_writer_is_the_plain_writer_piece_by_piece(tmp_path):
    """Same bytes as `write_safetensors` (same header, same order) whatever the piece size;
    `on_bytes` sees every piece; the order of the list is the file's order."""
    tensors = {k: v for k, v in _random_tensors(4).items() if v.ndim >= 1}
    write_safetensors(tmp_path / "plain.safetensors", tensors, metadata={"format": "pt"})
    seen: list[int] = []
    entries = [_streamed(n, tensors[n], rows=2) for n in sorted(tensors)]
    write_safetensors_streamed(tmp_path / "s.safetensors", entries, {"format": "pt"}, seen.append)
    plain = (tmp_path / "plain.safetensors").read_bytes()
    assert (tmp_path / "s.safetensors").read_bytes() == plain
    assert sum(seen) == sum(a.nbytes for a in tensors.values()) and len(seen) > len(tensors)
    write_safetensors_streamed(tmp_path / "r.safetensors", entries[::-1])
    with SafetensorsFile(tmp_path / "r.safetensors") as f:
        assert f.keys() == [e.name for e in entries[::-1]]


def test_streamed_writer_refuses_what_does_not_match_the_header(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = tmp_path / "x.safetensors"
    cases = [
        (StreamedTensor("w", "F32", (4, 3), lambda: (a[:2],)), r"'w': 24 of 48 bytes"),
        (StreamedTensor("w", "F16", (4, 3), lambda: (a,)), r"got float32 \[4, 3\], expected F16"),
        (StreamedTensor("w", "F32", (4, 4), lambda: (a,)), r"expected F32 \[4, 4\]"),
        (StreamedTensor("__metadata__", "F32", (4, 3), lambda: (a,)), "not a valid tensor"),
    ]
    for entry, match in cases:
        _raises(match, write_safetensors_streamed, path, [entry])
        assert not path.exists() and not (tmp_path / "x.safetensors.tmp").exists()
    twice = [_streamed("w", a, 4), _streamed("w", a, 4)]
    _raises("tensor name 'w' appears twice", write_safetensors_streamed, path, twice)
    _raises("metadata must map strings", write_safetensors, path, {"w": a}, {"n": 1})


def test_read_rows_copies_rows_without_mapping(tmp_path):
    tensors = _random_tensors(5)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors)
    raw = path.read_bytes()
    with SafetensorsFile(path) as f:
        for name, ref in tensors.items():
            start = f.offset(name)
            assert raw[start : start + ref.nbytes] == _raw_bytes(ref), name
            if ref.ndim:
                n = len(ref)
                for a, b in [(0, n), (n // 2, n), (n, n)] + ([(1, n - 1)] if n > 1 else []):
                    got = f.read_rows(name, a, b)
                    assert got.flags.owndata and _raw_bytes(got) == _raw_bytes(ref[a:b]), name
        _raises(r"tensor 't00.f64': no rows \[2, 9\)", f.read_rows, "t00.f64", 2, 9)
        _raises(r"tensor 't01.f32': no rows \[0, 1\)", f.read_rows, "t01.f32", 0, 1)  # 0-d
    with SafetensorsFile(path) as f:
        os.truncate(path, len(raw) - 8)  # shortened after its header was checked
        _raises(r"x.safetensors: truncated while reading 't15.u64'", f.read_rows, "t15.u64", 0, 3)
    with ShardedCheckpoint(_single(tmp_path, tensors)) as ckpt:
        assert _raw_bytes(ckpt.read_rows("t00.f64", 1, 3)) == _raw_bytes(tensors["t00.f64"][1:3])
        _raises("'nope' is not a shard of the checkpoint", ckpt.shard, "nope")


def _single(tmp_path: Path, tensors: dict) -> Path:
    (folder := tmp_path / "single").mkdir()
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


# ------------------------------------------------------------------ the official library


def test_reads_files_written_by_safetensors_numpy(tmp_path):
    from safetensors.numpy import save_file

    ours = {
        k: v
        for k, v in _random_tensors(1).items()
        if v.dtype.kind in "fiub"
        and dtype_name(v.dtype) not in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0")
    }
    save_file(ours, tmp_path / "x.safetensors", metadata={"format": "np"})
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert f.metadata == {"format": "np"} and sorted(f.keys()) == sorted(ours)
        for name, ref in ours.items():
            assert f.get(name).dtype == ref.dtype and _raw_bytes(f.get(name)) == _raw_bytes(ref)


def test_reads_files_written_by_safetensors_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    bits = lambda *s: torch.randint(0, 256, s, dtype=torch.uint8, generator=g)
    tensors = {
        "w.weight": bits(256, 128).view(torch.float8_e4m3fn),
        "w.scale": bits(2, 1).view(torch.float8_e8m0fnu),
        "e5m2": bits(3, 4).view(torch.float8_e5m2),
        "expert.weight": bits(128, 64).view(torch.int8),
        "bf16": bits(4, 6).view(torch.bfloat16),
        "tid2eid": torch.randint(0, 8, (16, 2), generator=g),
        "flag": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        for name, ref in tensors.items():
            got = f.get(name)
            assert got.shape == tuple(ref.shape)
            assert _raw_bytes(got) == _raw_bytes(ref), name
        assert f.info("w.weight").dtype == "F8_E4M3" and f.info("w.scale").dtype == "F8_E8M0"
        assert f.info("expert.weight").dtype == "I8" and f.info("tid2eid").dtype == "I64"


def test_our_files_are_read_by_the_official_library(tmp_path):
    pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.numpy import load_file as load_np
    from safetensors.torch import load_file as load_torch

    tensors = _random_tensors(2)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    by_torch = load_torch(path)
    assert sorted(by_torch) == sorted(tensors)
    for name, ref in tensors.items():
        assert tuple(by_torch[name].shape) == ref.shape
        assert _raw_bytes(by_torch[name]) == _raw_bytes(ref), name
    ml_only = ("bf16", "e4m3", "e5m2", "e8m0")
    numpy_only = {k: v for k, v in tensors.items() if not k.endswith(ml_only)}
    write_safetensors(path, numpy_only)
    by_numpy = load_np(path)
    assert sorted(by_numpy) == sorted(numpy_only)
    for name, ref in numpy_only.items():
        assert by_numpy[name].dtype == ref.dtype and _raw_bytes(by_numpy[name]) == _raw_bytes(ref)
    write_safetensors(path, tensors, metadata={"format": "pt"})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


# ------------------------------------------------------------------ sharded checkpoints


def _fixture_spec(name: str, cfg: dict) -> tuple[str, tuple[int, ...]]:
    """dtype and shape that the release format implies for a tensor of the fixture."""
    d, hd, h, hc = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["hc_mult"]
    inter, ne, ihd = cfg["moe_intermediate_size"], cfg["n_routed_experts"], cfg["index_head_dim"]
    m = re.match(r"(?:layers\.(\d+)|mtp\.\d+)\.", name)
    layer = int(m.group(1)) if m and m.group(1) else len(cfg["compress_ratios"]) - 1
    ratio = cfg["compress_ratios"][layer]
    coff = 2 if ratio == 4 else 1  # overlapping compression windows when ratio == 4
    q, g, olr = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"]
    fp8 = {  # [out, in] of the quantised linears
        "attn.wq_a": (q, d),
        "attn.wq_b": (h * hd, q),
        "attn.wkv": (hd, d),
        "attn.wo_a": (g * olr, h * hd // g),
        "attn.wo_b": (d, g * olr),
        "attn.indexer.wq_b": (cfg["index_n_heads"] * ihd, q),
        "e_proj": (d, d),
        "h_proj": (d, d),
        "shared_experts.w1": (inter, d),
        "shared_experts.w2": (d, inter),
        "shared_experts.w3": (inter, d),
        "experts.E.w1": (inter, d),
        "experts.E.w2": (d, inter),
        "experts.E.w3": (inter, d),
    }
    key = re.sub(r"experts\.\d+", "experts.E", name)
    key = re.sub(r"^(layers\.\d+|mtp\.\d+)\.(ffn\.)?", "", key)
    base, _, leaf = key.rpartition(".")
    if base in fp8:
        out, inn = fp8[base]
        if base.startswith("experts"):  # FP4: 2 codes per I8 byte, one scale per 32 inputs
            return ("I8", (out, inn // 2)) if leaf == "weight" else ("F8_E8M0", (out, inn // 32))
        return (
            ("F8_E4M3", (out, inn))
            if leaf == "weight"
            else ("F8_E8M0", (-(-out // 128), -(-inn // 128)))
        )
    table = {
        "embed.weight": ("BF16", (cfg["vocab_size"], d)),
        "head.weight": ("BF16", (cfg["vocab_size"], d)),
        "attn.attn_sink": ("F32", (h,)),
        "gate.weight": ("BF16", (ne, d)),
        "gate.bias": ("F32", (ne,)),
        "gate.tid2eid": ("I64", (cfg["vocab_size"], cfg["num_experts_per_tok"])),
        "attn.indexer.weights_proj.weight": ("BF16", (cfg["index_n_heads"], d)),
        "attn.compressor.wkv.weight": ("BF16", (coff * hd, d)),
        "attn.compressor.wgate.weight": ("BF16", (coff * hd, d)),
        "attn.compressor.ape": ("F32", (ratio, coff * hd)),
        "attn.compressor.norm.weight": ("BF16", (hd,)),
        "attn.indexer.compressor.wkv.weight": ("BF16", (coff * ihd, d)),
        "attn.indexer.compressor.wgate.weight": ("BF16", (coff * ihd, d)),
        "attn.indexer.compressor.ape": ("F32", (ratio, coff * ihd)),
        "attn.indexer.compressor.norm.weight": ("BF16", (ihd,)),
        "attn.q_norm.weight": ("BF16", (q,)),
        "attn.kv_norm.weight": ("BF16", (hd,)),
    }
    if key in table:
        return table[key]
    if key.endswith("norm.weight"):
        return "BF16", (d,)
    mix = {"attn": (2 + hc) * hc, "ffn": (2 + hc) * hc, "head": hc}[key.split("_")[1]]
    return "F32", {"fn": (mix, hc * d), "base": (mix,), "scale": (3 if mix > hc else 1,)}[
        key.rpartition("_")[2]
    ]


def test_fixture_opens_with_release_dtypes_and_shapes():
    cfg = json.loads((FIXTURE / "config.json").read_text())
    index = json.loads((FIXTURE / INDEX_FILE).read_text())
    with ShardedCheckpoint(FIXTURE) as ckpt:
        ckpt.validate()
        assert ckpt.keys() == list(index["weight_map"])
        total = 0
        for name in ckpt.keys():
            info, arr = ckpt.info(name), ckpt.get(name)
            assert ckpt.shard_of(name) == index["weight_map"][name]
            assert (info.dtype, info.shape) == _fixture_spec(name, cfg), name
            assert arr.dtype == numpy_dtype(info.dtype) and arr.shape == info.shape
            total += info.nbytes
        assert total == ckpt.metadata["total_size"]
        assert ckpt.info("layers.0.attn.wq_a.weight") == TensorInfo("F8_E4M3", (128, 256), 32768)
        assert ckpt.info("layers.0.attn.wq_a.scale") == TensorInfo("F8_E8M0", (1, 2), 2)
        assert ckpt.info("layers.0.ffn.experts.3.w2.weight").dtype == "I8"
        tid2eid = ckpt.get("layers.0.ffn.gate.tid2eid")
        assert tid2eid.shape == (1024, 2) and tid2eid.dtype == np.int64
        assert tid2eid.min() >= 0 and tid2eid.max() < 8 and (tid2eid[:, 0] != tid2eid[:, 1]).all()
        assert sum(k.endswith(".w1.weight") and ".experts." in k for k in ckpt.keys()) == 5 * 8
        _raises("tensor 'nope' not in the checkpoint", ckpt.get, "nope")


def test_fixture_matches_the_official_library_bit_for_bit():
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    with ShardedCheckpoint(FIXTURE) as ckpt:
        for shard in sorted(set(map(ckpt.shard_of, ckpt.keys()))):
            for name, ref in load_file(FIXTURE / shard).items():
                assert _raw_bytes(ckpt.get(name)) == _raw_bytes(ref), name


def test_written_shards_and_single_file_folders(tmp_path):
    tensors = _random_tensors(3)
    names = sorted(tensors)
    shards = {"a.safetensors": names[:7], "b.safetensors": names[7:]}
    for shard, keys in shards.items():
        write_safetensors(tmp_path / shard, {k: tensors[k] for k in keys})
    write_index(
        tmp_path,
        {k: s for s, ks in shards.items() for k in ks},
        sum(v.nbytes for v in tensors.values()),
    )
    single = tmp_path / "single"
    single.mkdir()
    write_safetensors(single / "model.safetensors", tensors, metadata={"format": "np"})
    for folder in (tmp_path, single):
        with ShardedCheckpoint(folder) as ckpt:
            assert sorted(ckpt.keys()) == names
            for name, ref in tensors.items():
                assert _raw_bytes(ckpt.get(name)) == _raw_bytes(ref)
    assert ShardedCheckpoint(single).shard_of(names[0]) == "model.safetensors"
    assert ShardedCheckpoint(tmp_path).shard_of(names[-1]) == "b.safetensors"


# ------------------------------------------------------------------ bad inputs


def test_truncated_shard(tmp_path):
    folder = _copy_fixture(tmp_path / "ckpt")
    with SafetensorsFile(FIXTURE / SHARD1) as f:
        last = max(f.keys(), key=lambda k: f.offset(k) + f.info(k).nbytes)
    with open(folder / SHARD1, "r+b") as fh:
        fh.truncate((folder / SHARD1).stat().st_size - 10)
    ckpt = ShardedCheckpoint(folder)  # shards open lazily
    msg = _raises("truncated", ckpt.validate)
    assert SHARD1 in msg and repr(last) in msg


@pytest.mark.parametrize(
    ("header", "n", "match"),
    [
        (b"{not json", None, "corrupted header: invalid JSON"),
        (b"[1, 2]", None, "corrupted header: JSON is not an object"),
        (b"{}", 4096, "header length 4096 exceeds the file size"),
        ({"a": {"dtype": "F32", "shape": [1]}}, None, "tensor 'a': entry needs"),
        ({"__metadata__": {"a": 1}}, None, "__metadata__ must map strings"),
    ],
)
def test_corrupted_header(tmp_path, header, n, match):
    path = _write_raw(tmp_path / "bad.safetensors", header, n=n)
    assert "bad.safetensors" in _raises(match, SafetensorsFile, path)
    (tmp_path / "tiny").write_bytes(b"\x01\x02")
    _raises("tiny: truncated", SafetensorsFile, tmp_path / "tiny")


def test_unknown_dtype(tmp_path):
    path = _write_raw(
        tmp_path / "x", {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"
    )
    _raises(r"x: tensor 'w': unknown dtype 'F4'", SafetensorsFile, path)


def test_offsets_inconsistent_with_shape(tmp_path):
    header = {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}}
    path = _write_raw(tmp_path / "x", header, bytes(16))
    _raises(
        r"x: tensor 'w': data_offsets \[0, 8\] inconsistent with BF16 \[2, 3\] \(12 bytes\)",
        SafetensorsFile,
        path,
    )
    header["w"]["data_offsets"] = [4, 0]
    _raises("inconsistent", SafetensorsFile, _write_raw(tmp_path / "x", header, bytes(16)))


def test_index_points_to_missing_shard(tmp_path):
    folder = _copy_fixture(tmp_path / "ckpt")
    (folder / SHARD1).unlink()
    _raises(
        rf"shard '{SHARD1}' \(holding tensor 'embed.weight'\) does not exist",
        ShardedCheckpoint,
        folder,
    )


def test_tensor_in_index_missing_from_shard(tmp_path):
    folder = _copy_fixture(tmp_path / "ckpt")
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["layers.0.attn.ghost"] = SHARD1
    (folder / INDEX_FILE).write_text(json.dumps(index))
    msg = _raises(
        "'layers.0.attn.ghost' is listed in the index but missing from this shard",
        ShardedCheckpoint(folder).get,
        "embed.weight",
    )
    assert SHARD1 in msg


def test_tensor_in_shard_missing_from_index(tmp_path):
    folder = _copy_fixture(tmp_path / "ckpt")
    index = json.loads((folder / INDEX_FILE).read_text())
    del index["weight_map"]["layers.0.attn.wq_a.scale"]
    (folder / INDEX_FILE).write_text(json.dumps(index))
    msg = _raises(
        "'layers.0.attn.wq_a.scale' is in this shard but not in the index",
        ShardedCheckpoint(folder).validate,
    )
    assert SHARD1 in msg


def test_bad_folders_and_indexes(tmp_path):
    _raises("checkpoint folder does not exist", ShardedCheckpoint, tmp_path / "nope")
    _raises(f"neither {INDEX_FILE} nor model.safetensors found", ShardedCheckpoint, tmp_path)
    (tmp_path / INDEX_FILE).write_text("{oops")
    _raises("malformed index JSON", ShardedCheckpoint, tmp_path)
    (tmp_path / INDEX_FILE).write_text('{"weight_map": {"a": 3}}')
    _raises("'weight_map' must map names to files", ShardedCheckpoint, tmp_path)
