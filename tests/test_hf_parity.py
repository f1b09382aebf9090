"""Structural parity with HF transformers' `DeepseekV4ForCausalLM` in float32 (oracle 1).

Both sides run the same release folder in float32: ours as `numerics="bf16", dtype=float32`,
HF after its exact FP8 / FP4 dequantisation. HF omits only the QAT simulations (absent from
our bf16 mode too) and the Hadamard rotation (orthogonal: it does not change q . k). What is
left is float32 summation order, so logits must agree to 1e-4 of their scale.

The indexer's top-k can tie exactly at 0 (every head's ReLU off) and torch and jax order ties
differently; configurations with more indexer heads make such ties vanishingly rare.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax.checkpoint.synthetic import write_release_checkpoint

pytest.importorskip("transformers")
from tests.oracles import hf  # noqa: E402

pytestmark = pytest.mark.oracle

CASES = {
    # window, CSA, HCA, CSA; hash then top-k MoE; 45 tokens: 11 ratio-4 entries > index_topk 8
    "tiny_s45": (v4jax.config.tiny(index_heads=16), 45),
    # CSA first, index_topk 2 of 9 entries, window-only middle layer, one hash layer
    "csa_first_s37": (
        v4jax.config.tiny(
            compress_ratios=(4, 128, 0, 4, 128, 0), num_hash_layers=1, index_topk=2, index_heads=16
        ),
        37,
    ),
    # Pro-like HCA start, FP8 routed experts, no hash layers; 141 tokens: one complete
    # ratio-128 entry, 35 ratio-4 entries (> index_topk 8), window wrap-around
    "hca_fp8_s141": (
        v4jax.config.tiny(
            compress_ratios=(128, 128, 4, 0), num_hash_layers=0, expert_dtype="fp8", index_heads=16
        ),
        141,
    ),
    # the fixture's shape (4 indexer heads) with index_topk >= entries: no selection, no ties
    "tiny_all_entries_s141": (v4jax.config.tiny(index_topk=64), 141),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    cfg, length = CASES[request.param]
    folder = write_release_checkpoint(cfg, tmp_path_factory.mktemp(request.param), seed=7)
    tokens = np.random.default_rng(1).integers(2, cfg.vocab_size, (2, length))
    tokens[:, 0] = 0
    return folder, tokens


def test_logits_match_hf_float32(case):
    folder, tokens = case
    ours = np.asarray(
        v4jax.load(folder, numerics="bf16", dtype=jnp.float32, progress=False).logits(tokens)
    )
    theirs = hf.hf_logits(folder, tokens)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= 1e-4, rel
