"""Component-level parity with HF transformers (float32): each of our modules is fed the exact
input HF's corresponding submodule received in a full forward, and must return its output.
Tolerance: 1e-5 of the output scale (float32 summation order only)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax.checkpoint.synthetic import write_release_checkpoint
from v4jax.model.attention import entry_visible

pytest.importorskip("transformers")
from tests.oracles import hf  # noqa: E402

pytestmark = pytest.mark.oracle

CFG = v4jax.config.tiny(index_heads=16)  # layers: 0 window+hash, 1 CSA+hash, 2 HCA, 3 CSA
LENGTH = 141  # > 128: one complete ratio-128 entry; 35 ratio-4 entries > index_topk 8
MODULES = {
    "hc": "model.layers.1.attn_hc",
    "attn_csa": "model.layers.1.self_attn",
    "attn_hca": "model.layers.2.self_attn",
    "attn_window": "model.layers.0.self_attn",
    "compressor_csa": "model.layers.3.self_attn.compressor",
    "compressor_hca": "model.layers.2.self_attn.compressor",
    "indexer": "model.layers.3.self_attn.compressor.indexer",
    "moe_hash": "model.layers.0.mlp",
    "moe_topk": "model.layers.2.mlp",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = write_release_checkpoint(CFG, tmp_path_factory.mktemp("hfc"), seed=11)
    tokens = np.random.default_rng(2).integers(2, CFG.vocab_size, (2, LENGTH))
    tokens[:, 0] = 0
    cap = hf.hf_capture(hf.hf_model(folder), tokens, list(MODULES.values()))
    ours = v4jax.load(folder, numerics="bf16", dtype=jnp.float32, progress=False)
    return ours, tokens, {k: cap[v] for k, v in MODULES.items()}


def _np(t) -> np.ndarray:
    return t.detach().float().numpy()


def _close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    rel = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert rel <= tol, rel


def test_mhc_site(setup):
    ours, _, cap = setup
    args, _, (post, comb, collapsed) = cap["hc"]
    y, p, c = ours.layer(1).hc_attn.pre(jnp.asarray(_np(args[0])))
    _close(y, _np(collapsed))
    _close(p, _np(post))
    _close(c, _np(comb))


@pytest.mark.parametrize("name, layer", [("attn_window", 0), ("attn_csa", 1), ("attn_hca", 2)])
def test_attention(setup, name, layer):
    ours, _, cap = setup
    args, _, out = cap[name]
    _close(ours.layer(layer).attn(jnp.asarray(_np(args[0]))), _np(out[0]))


@pytest.mark.parametrize("name, layer", [("compressor_csa", 3), ("compressor_hca", 2)])
def test_compressor(setup, name, layer):
    ours, _, cap = setup
    args, _, out = cap[name]
    got = ours.layer(layer).attn.compressor(jnp.asarray(_np(args[0])))
    _close(got, _np(out[0])[:, 0])


def test_indexer_top_k_sets(setup):
    ours, _, cap = setup
    args, _, out = cap["indexer"]
    u, qr = jnp.asarray(_np(args[0])), jnp.asarray(_np(args[1]))
    ix = ours.layer(3).attn.indexer
    b, s, _ = u.shape
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    keys = ix.compressor(u)
    vis = jnp.broadcast_to(entry_visible(jnp.arange(s), keys.shape[1], 4), (b, s, keys.shape[1]))
    got = np.sort(np.asarray(ix(u, qr, pos, keys, vis)), axis=-1)
    want = np.sort(out.numpy(), axis=-1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name, layer", [("moe_hash", 0), ("moe_topk", 2)])
def test_moe(setup, name, layer):
    ours, tokens, cap = setup
    args, kwargs, out = cap[name]
    got = ours.layer(layer).ffn(jnp.asarray(_np(args[0])), jnp.asarray(tokens))
    _close(got, _np(out))
