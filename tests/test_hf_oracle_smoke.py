"""Smoke tests of the HF transformers oracle (tests/oracles/hf.py) on synthetic and fixture data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from v4jax.checkpoint.synthetic import write_release_checkpoint  # noqa: E402
from v4jax.config import ModelConfig, tiny  # noqa: E402

try:  # `python -m pytest` from the repo root, or tests/ turned into a package
    from tests.oracles import hf
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    from oracles import hf  # type: ignore[no-redef]

pytestmark = pytest.mark.oracle

FIXTURE = Path(__file__).parent / "data" / "v4-tiny-flash"

VARIANTS: dict[str, ModelConfig] = {
    "tiny": tiny(),
    # CSA first, two HCA layers, one hash layer, indexer keeps only 2 entries
    "csa_first_topk2": tiny(
        compress_ratios=(4, 128, 0, 4, 128, 0), num_hash_layers=1, index_topk=2
    ),
    # Pro-like HCA bootstrap, FP8 routed experts (no expert_dtype fp4), no hash routing
    "hca_fp8_experts": tiny(
        compress_ratios=(128, 128, 4, 0), num_hash_layers=0, expert_dtype="fp8"
    ),
}


def _tokens(cfg: ModelConfig, batch: int, length: int, seed: int) -> np.ndarray:
    t = np.random.default_rng(seed).integers(2, cfg.vocab_size, (batch, length))
    t[:, 0] = cfg.bos_token_id
    return t


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_oracle")
    return {
        name: write_release_checkpoint(cfg, root / name, seed=0) for name, cfg in VARIANTS.items()
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_checkpoint_loads_and_runs(folders: dict[str, Path], variant: str) -> None:
    cfg, folder = VARIANTS[variant], folders[variant]
    model = hf.hf_model(folder)  # raises on missing / unexpected / mismatched / differing weights
    assert model.config.layer_types == [
        {
            0: "sliding_attention",
            4: "compressed_sparse_attention",
            128: "heavily_compressed_attention",
        }[r]
        for r in cfg.layer_ratios
    ]
    assert model.config.mlp_layer_types == (
        ["hash_moe"] * cfg.num_hash_layers + ["moe"] * (cfg.num_layers - cfg.num_hash_layers)
    )
    tokens = _tokens(cfg, 2, 140, seed=1)  # > 128: every layer type has compressed entries
    logits = hf.hf_logits(folder, tokens)
    assert logits.shape == (2, 140, cfg.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and logits.std() > 0.1
    # Causal and batch-independent: a prefix of row 1 alone gives the same logits. The prefix
    # stays where the indexer keeps every complete entry: with 4 indexer heads many entries
    # score exactly 0 (all ReLUs off) and torch.topk orders such ties differently for other
    # entry counts, which legitimately changes a few positions beyond that.
    n = min(60, 4 * (cfg.index_topk + 1))
    alone = hf.hf_logits(folder, tokens[1:, :n])
    np.testing.assert_allclose(alone[0], logits[1, :n], atol=1e-4, rtol=0)
    assert hf.hf_model(folder) is model  # cached


def test_capture_submodules(folders: dict[str, Path]) -> None:
    model = hf.hf_model(folders["tiny"])
    names = [
        "model.layers.0.attn_hc",
        "model.layers.1.self_attn.compressor.indexer",
        "model.layers.2.mlp",
    ]
    cap = hf.hf_capture(model, _tokens(tiny(), 1, 24, seed=2), names)
    post, comb, collapsed = cap["model.layers.0.attn_hc"][2]
    assert post.shape == (1, 24, 4) and comb.shape == (1, 24, 4, 4)
    assert collapsed.shape == (1, 24, 256)
    topk = cap["model.layers.1.self_attn.compressor.indexer"][2]
    assert topk.shape == (1, 24, 6)  # min(index_topk, 24 // 4) picks, -1 where not complete
    assert (
        hf.hf_name("layers.1.attn.indexer.compressor.ape")
        == "model.layers.1.self_attn.compressor.indexer.position_bias"
    )
    assert hf.hf_name("mtp.0.e_proj.weight") is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fixture_logits_match_readme(dtype: str) -> None:
    """HF on the fixture is as close to the golden logits as the fixture README reports."""
    golden = np.load(FIXTURE / "golden.npz")
    tokens = golden["p037_tokens"][None]
    logits = hf.hf_logits(FIXTURE, tokens, dtype=dtype)
    assert logits.shape == (1, 37, 1024)
    last = logits[0, -1]
    assert np.abs(last - golden["p037_prefill_logits"]).max() <= 0.15  # README: 0.096 (bf16)
    assert np.abs(last - golden["smooth_p037_prefill_logits"]).max() <= 0.05  # README: 0.028
    assert last.argmax() == golden["p037_prefill_logits"].argmax()
