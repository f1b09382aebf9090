"""Bad checkpoints: every problem is reported by tensor name with expected vs found."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

import v4jax
from v4jax.checkpoint.safetensors import ShardedCheckpoint, write_index, write_safetensors

CFG = v4jax.config.tiny(compress_ratios=(0, 4, 128, 0), num_hash_layers=1)


@pytest.fixture(scope="module")
def tensors():
    from v4jax.checkpoint.synthetic import random_release_tensors

    return random_release_tensors(CFG, seed=0)


def _write(folder, tensors, cfg=CFG):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(v4jax.config.to_dict(cfg)))
    write_safetensors(folder / "model-00001-of-00001.safetensors", tensors)
    write_index(
        folder,
        {n: "model-00001-of-00001.safetensors" for n in tensors},
        sum(a.nbytes for a in tensors.values()),
    )
    return folder


def test_good_checkpoint_loads(tmp_path, tensors):
    model = v4jax.load(_write(tmp_path / "ok", tensors), numerics="bf16", progress=False)
    assert model.logits(np.array([[0, 5, 7]])).shape == (1, 3, CFG.vocab_size)


def test_missing_tensor(tmp_path, tensors):
    t = dict(tensors)
    del t["layers.1.attn.wq_b.scale"]
    with pytest.raises(v4jax.CheckpointError, match=r"missing tensor layers\.1\.attn\.wq_b\.scale"):
        v4jax.load(_write(tmp_path / "m", t), progress=False)


def test_unexpected_tensor(tmp_path, tensors):
    t = dict(tensors, **{"layers.0.attn.bogus.weight": np.zeros(3, np.float32)})
    with pytest.raises(v4jax.CheckpointError, match=r"unexpected tensor layers\.0\.attn\.bogus"):
        v4jax.load(_write(tmp_path / "u", t), progress=False)


def test_wrong_shape(tmp_path, tensors):
    t = dict(tensors)
    t["layers.0.attn.kv_norm.weight"] = np.ones(64, ml_dtypes.bfloat16)
    with pytest.raises(
        v4jax.CheckpointError, match=r"kv_norm\.weight: expected BF16 \[128\], found BF16 \[64\]"
    ):
        v4jax.load(_write(tmp_path / "s", t), progress=False)


def test_wrong_dtype(tmp_path, tensors):
    t = dict(tensors)
    t["layers.0.attn.wq_a.weight"] = t["layers.0.attn.wq_a.weight"].astype(np.float32)
    with pytest.raises(
        v4jax.CheckpointError, match=r"wq_a\.weight: expected F8_E4M3 \[128, 256\], found F32"
    ):
        v4jax.load(_write(tmp_path / "d", t), progress=False)


def test_config_disagrees_with_weights(tmp_path, tensors):
    folder = _write(tmp_path / "c", tensors, cfg=CFG.replace(moe_inter_dim=256))
    with pytest.raises(v4jax.CheckpointError, match=r"shared_experts\.w1\.weight: expected"):
        v4jax.load(folder, progress=False)


def test_nan_in_weights(tmp_path, tensors):
    t = dict(tensors)
    w = t["norm.weight"].copy()
    w[3] = np.nan
    t["norm.weight"] = w
    with pytest.raises(v4jax.CheckpointError, match=r"norm\.weight: contains NaN or Inf"):
        v4jax.load(_write(tmp_path / "n", t), progress=False)


def test_bad_hash_table(tmp_path, tensors):
    t = dict(tensors)
    bad = t["layers.0.ffn.gate.tid2eid"].copy()
    bad[0, 0] = CFG.num_experts
    t["layers.0.ffn.gate.tid2eid"] = bad
    with pytest.raises(v4jax.CheckpointError, match=r"tid2eid: expert ids outside"):
        v4jax.load(_write(tmp_path / "h", t), progress=False)


def test_not_a_release_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(v4jax.CheckpointError, match="not an official release folder"):
        v4jax.load(tmp_path / "x")
    with pytest.raises(v4jax.CheckpointError, match="not a directory"):
        v4jax.load(tmp_path / "nothing")


def test_fixture_every_tensor_is_used(fixture_dir, tmp_path):
    """Dropping any one fixture tensor kind is reported (spot check of the name map)."""
    names = ShardedCheckpoint(fixture_dir).keys()
    assert any(n.startswith("mtp.0.ffn.experts.") for n in names)
    folder = tmp_path / "fx"
    shutil.copytree(fixture_dir, folder)
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    idx["weight_map"]["layers.3.attn.indexer.ghost"] = idx["weight_map"]["norm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(v4jax.CheckpointError):
        v4jax.load(folder, progress=False)
