"""LoRA fine-tuning on the release-format base (`v4jax.train.lora`).

One tiny model (a hash window layer, two stacked CSA layers, the MTP block) in the float32
"bf16" numerics, fine-tuned on repeated English text (module fixture `run`, read by the
training test only; the file and merge tests use large random adapters). Oracles: the base
model itself (B = 0 and the base leaves, bit for bit), numpy float64 (merged weights, the FP8
rounding bound), the config fields (Flash parameter counts) and the real allocations (tiny
accounting).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import v4jax
from v4jax.checkpoint.synthetic import dequantize_fp8_blocks, quantize_fp8_blocks
from v4jax.train import lora, optim
from v4jax.train.data import ByteTokenizer
from v4jax.train.model import _flatten, trainable

CFG = v4jax.config.tiny(compress_ratios=(0, 4, 4, 0), num_hash_layers=1)
RANK, ALPHA, STEPS, LR, S, B = 8, 16.0, 30, 1e-2, 64, 4
TOKENS = np.random.default_rng(7).integers(0, CFG.vocab_size, (2, 64))
RELEASE_DTYPES = {
    jnp.dtype(d)
    for d in (jnp.float8_e4m3fn, jnp.float8_e8m0fnu, jnp.int8, jnp.bfloat16, jnp.float32, jnp.int32)
}
TEXT = """The lighthouse keeper climbed the stairs every evening before the sun went down. There
were one hundred and twelve steps, and he counted them aloud, because counting kept his mind on
the work and off the wind. At the top he cleaned the glass, trimmed the wick, and filled the lamp
with oil. Then he sat by the window with a cup of tea and watched the boats come home across the
bay. Some nights the sea was calm and the boats moved slowly, their small lights rocking like
stars on the water. Other nights the waves rose high and white, and he kept the lamp burning
until morning. The fishermen knew his light and trusted it. When they saw it they knew where the
rocks were and where the harbour began. In the spring the keeper painted the door and the
railings, and in the summer he mended the roof. In the autumn he gathered wood for the stove,
and in the winter he read old books by the fire while the storms passed over the island. He did
not mind being alone. The gulls kept him company, and the boats, and the light itself, which
turned and turned all night long above the dark water. When the keeper grew old, a young woman
came to learn the work. She counted the steps with him, cleaned the glass, trimmed the wick, and
filled the lamp with oil. She watched the boats come home across the bay, and she kept the lamp
burning until morning."""


def _host(tree) -> dict:
    return {p: np.array(a) for p, a in _flatten(tree).items()}


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.fixture(scope="module")
def base():
    return v4jax.init(CFG, seed=0, numerics="bf16", dtype=jnp.float32)


@pytest.fixture(scope="module")
def random_lm(base):
    """Adapters with random A and B, sized so that s B A is about half of W (a large update:
    every FP8 rounding case and every block scale change occurs in the merge)."""
    lm = lora.attach(base, RANK, ALPHA, seed=2)
    rng, out = np.random.default_rng(2), {}
    for path, ad in lora._by_linear(lm.adapters).items():
        b = rng.standard_normal(ad["lora_b"].shape)
        w = _dense(_leaf(lm.base, (*path, "weight")), _leaf(lm.base, (*path, "scale")))
        b *= 0.5 * np.linalg.norm(w) / np.linalg.norm(lm.spec.scale * b @ np.asarray(ad["lora_a"]))
        out[(*path, "lora_a")], out[(*path, "lora_b")] = ad["lora_a"], jnp.asarray(b, jnp.float32)
    return lm.replace(adapters=lora._unflatten(out))


@pytest.fixture(scope="module")
def run(base):
    """Train on the first 80% of the text (random 64-token windows), hold out the rest."""
    ids = np.asarray(ByteTokenizer().encode(TEXT), np.int32)
    cut = int(0.8 * len(ids))
    train, held = ids[:cut], ids[cut:]
    held = np.stack([held[i * S : (i + 1) * S] for i in range(len(held) // S)])
    rng = np.random.default_rng(0)
    before = _host({"base": nnx.to_pure_dict(base.state)})
    lm0 = lora.attach(base, RANK, ALPHA, seed=0)
    first = np.stack([train[s : s + S] for s in rng.integers(0, cut - S, B)])
    grads0 = lora.value_and_grad(lm0, first)[2]
    opt = lora.make_optimizer(lm0.adapters, schedule=LR)
    step, state, lm, history = lora.make_step(opt), opt.init(lm0.adapters), lm0, []
    for _ in range(STEPS):
        batch = np.stack([train[s : s + S] for s in rng.integers(0, cut - S, B)])
        lm, state, metrics = step(lm, state, batch)
        history.append(float(metrics["lm"]))
    return dict(
        lm0=lm0,
        lm=lm,
        grads0=grads0,
        before=before,
        held=held,
        train=train,
        heldout=(lora.evaluate(lm0, held), lora.evaluate(lm, held)),
        history=history,
    )


@pytest.mark.slow
def test_zero_b_gives_base_logits_bitwise():
    """Reference numerics (bf16, FP8 activation simulation): B = 0 adds exactly 0."""
    model = v4jax.init(CFG, seed=1)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 40))
    lm = lora.attach(model, 4, seed=3)
    assert any(np.abs(a).max() > 0 for p, a in _host(lm.adapters).items() if p[-1] == "lora_a")
    np.testing.assert_array_equal(_bits(lm.logits(tokens)), _bits(model.logits(tokens)))


@pytest.mark.slow
def test_only_adapters_train_and_heldout_loss_drops(base, run):
    lm0, lm = run["lm0"], run["lm"]
    adapter_paths = set(_flatten(lm0.adapters))
    assert set(_flatten(run["grads0"])) == adapter_paths  # gradients exist for adapters only
    assert all(p[-1] in lora.LEAVES for p in adapter_paths)
    # At B = 0, dL/dA = s B^T (...) is exactly 0 while dL/dB is not.
    g = _flatten(run["grads0"])
    assert all(not np.any(np.asarray(g[p])) for p in adapter_paths if p[-1] == "lora_a")
    assert any(np.any(np.asarray(g[p])) for p in adapter_paths if p[-1] == "lora_b")
    # The base: the same arrays (no copy), bit for bit unchanged, still in release dtypes.
    after = _flatten({"base": lm.base})
    assert set(after) == set(run["before"])
    live = _flatten({"base": nnx.to_pure_dict(base.state)})
    for p, a in after.items():
        assert a is live[p], p
        assert jnp.dtype(a.dtype) in RELEASE_DTYPES, p
        np.testing.assert_array_equal(_bits(a), _bits(run["before"][p]), err_msg=str(p))
    assert any(jnp.dtype(a.dtype) == jnp.float8_e4m3fn for a in after.values())
    # Held-out loss: the random base is no better than chance; after the run the model must
    # beat a uniform guess over the distinct tokens of the training text (it has learnt which
    # few tokens occur and how often), and the held-out loss must have dropped.
    h0, h1 = run["heldout"]
    chance = math.log(len(np.unique(run["train"])))
    assert h0 > math.log(CFG.vocab_size) - 1.0
    assert h1 < chance < h0, (h0, h1, chance)
    assert run["history"][-1] < run["history"][0]


@pytest.mark.slow
def test_adapters_save_reload_bitwise_and_refuse_other_models(base, random_lm, tmp_path):
    lm, path = random_lm, tmp_path / "adapter.safetensors"
    lora.save_adapters(lm, path)
    back = lora.load_adapters(base, path)
    assert back.spec == lm.spec
    want, got = _host(lm.adapters), _host(back.adapters)
    assert set(want) == set(got)
    for p in want:
        np.testing.assert_array_equal(_bits(got[p]), _bits(want[p]), err_msg=str(p))
    tokens = TOKENS
    np.testing.assert_array_equal(_bits(back.logits(tokens)), _bits(lm.logits(tokens)))
    # The unmerged adapters served through a v4jax.Model (prefill / decode entry points).
    np.testing.assert_array_equal(
        _bits(back.serving_model().logits(tokens)), _bits(lm.logits(tokens))
    )
    other_cfg = v4jax.init(CFG.replace(q_lora_rank=256), numerics="bf16", dtype=jnp.float32)
    with pytest.raises(v4jax.CheckpointError, match="another model config.*q_lora_rank"):
        lora.load_adapters(other_cfg, path)
    other_weights = v4jax.init(CFG, seed=5, numerics="bf16", dtype=jnp.float32)
    with pytest.raises(v4jax.CheckpointError, match="base weights differ"):
        lora.load_adapters(other_weights, path)
    assert lora.load_adapters(other_weights, path, check_base=False).spec == lm.spec


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


def _dense(w, s) -> np.ndarray:
    """float64 dequantised FP8 weight [..., O, I] (numpy oracle, per stacked matrix)."""
    w, s = np.asarray(w), np.asarray(s)
    flat = [
        dequantize_fp8_blocks(a, b)
        for a, b in zip(w.reshape(-1, *w.shape[-2:]), s.reshape(-1, *s.shape[-2:]), strict=True)
    ]
    return np.stack(flat).reshape(w.shape).astype(np.float64)


def test_merge_rounds_to_nearest_fp8_and_exports(base, random_lm, tmp_path):
    """Random adapters: merged FP8 weights = W + s B A rounded to the nearest e4m3 value at the
    release recipe's block scale; float32 merge within float32 rounding; B = 0 merges to the
    base's values; `export_hf` writes the merged model and `load` reads it back."""
    lm, scale = random_lm, ALPHA / RANK
    merged, exact = lora.merge(lm), lora.merge(lm, quantize=False)
    q_state, f_state = nnx.to_pure_dict(merged.state), nnx.to_pure_dict(exact.state)
    kept, changed = 0.0, 0.0
    for path, ad in lora._by_linear(lm.adapters).items():
        w = _dense(_leaf(lm.base, (*path, "weight")), _leaf(lm.base, (*path, "scale")))
        a, b = np.asarray(ad["lora_a"], np.float64), np.asarray(ad["lora_b"], np.float64)
        want = w + scale * (b @ a)  # [..., O, I]
        # float32 merge: the einsum's R products + one add, each within 2^-24 relative.
        f32 = _leaf(f_state, (*path, "weight"))
        bound = (RANK + 2) * 2.0**-24 * (np.abs(w) + scale * (np.abs(b) @ np.abs(a)))
        assert np.all(np.abs(f32 - want) <= bound), path
        # FP8 merge: scales = the release recipe on W'; values within half an e4m3 step.
        qw, qs = _leaf(q_state, (*path, "weight")), _leaf(q_state, (*path, "scale"))
        flat = want.astype(np.float32).reshape(-1, *want.shape[-2:])
        recipe = np.stack([quantize_fp8_blocks(m)[1] for m in flat]).reshape(qs.shape)
        np.testing.assert_array_equal(_bits(qs), _bits(recipe), err_msg=str(path))
        got = _dense(qw, qs)
        sigma = np.repeat(np.repeat(qs.astype(np.float64), 128, -2), 128, -1)
        sigma = sigma[..., : want.shape[-2], : want.shape[-1]]  # each element's block scale
        v = np.abs(want) / sigma  # in units of the block scale; e4m3 normal from 2^-6
        half = (
            np.where(v >= 2.0**-6, np.exp2(np.floor(np.log2(np.maximum(v, 2.0**-6))) - 4), 2.0**-10)
            * sigma
        )
        # (+ the float32 error of W' itself, which can move it across a rounding midpoint)
        assert np.all(np.abs(got - want) <= half + bound), path
        kept += np.sum((got - w) * (want - w))
        changed += np.sum((want - w) ** 2)
    assert changed > 0 and kept > 0
    # B = 0: adapted weights keep their values (a block's scale may shrink where the base's
    # amax rounded down onto the next binade: same values, finer scale); the rest is untouched.
    fresh = nnx.to_pure_dict(lora.merge(lora.attach(base, RANK, ALPHA)).state)
    adapted = lora._by_linear(lm.adapters)
    for p, a in _flatten(nnx.to_pure_dict(base.state)).items():
        if p[:-1] not in adapted:
            np.testing.assert_array_equal(_bits(_leaf(fresh, p)), _bits(a), err_msg=str(p))
        elif p[-1] == "weight":
            old = _dense(a, _leaf(nnx.to_pure_dict(base.state), (*p[:-1], "scale")))
            new = _dense(_leaf(fresh, p), _leaf(fresh, (*p[:-1], "scale")))
            np.testing.assert_array_equal(new, old, err_msg=str(p))
    v4jax.export_hf(merged, tmp_path / "merged")
    back = v4jax.load(tmp_path / "merged", numerics="bf16", dtype=jnp.float32, progress=False)
    for p, a in _flatten(nnx.to_pure_dict(back.state)).items():
        np.testing.assert_array_equal(_bits(a), _bits(_leaf(q_state, p)), err_msg=str(p))


def _representable(lm):
    """Adapters whose merge is exactly representable: B picks rows 0..R-1, A = -2 W[:R] / s, so
    those rows of W' = W + s B A are -W[:R] (same FP8 grid, same block amax and scales)."""
    out, scale = {}, lm.spec.scale
    for path, ad in lora._by_linear(lm.adapters).items():
        w = _dense(_leaf(lm.base, (*path, "weight")), _leaf(lm.base, (*path, "scale")))
        a = (-2.0 / scale) * w[..., :RANK, :]  # exact: FP8 values times powers of two
        b = np.zeros(ad["lora_b"].shape)
        b[..., np.arange(RANK), np.arange(RANK)] = 1.0
        out[(*path, "lora_a")], out[(*path, "lora_b")] = a, b
    return lm.replace(
        adapters=lora._unflatten({p: jnp.asarray(a, jnp.float32) for p, a in out.items()})
    )


def test_merged_model_equals_adapted_forward(base):
    """Where W + s B A is on the FP8 grid the release-format merge is exact, so the merged
    model's logits equal the adapted model's up to float32 summation order (the adapter path
    sums x A^T then (.) B^T, the merged linear x W'^T: each float32 dot of <= 512 terms is
    within ~512 * 2^-24 = 3e-5 of its sum of magnitudes, partly cancelling, through 3 blocks);
    1e-5 of the logit range holds that, while a wrong scale, orientation or block scale moves
    the logits by a tenth of the range (the sign flip of R rows per projection, checked)."""
    lm = _representable(lora.attach(base, RANK, ALPHA))
    adapted = np.asarray(lm.logits(TOKENS))
    merged = np.asarray(lora.merge(lm).logits(TOKENS))
    span = np.max(np.abs(adapted))
    assert np.max(np.abs(adapted - np.asarray(base.logits(TOKENS)))) > 0.1 * span  # it matters
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-5 * span)


def _nbytes(tree) -> int:
    return sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))


def test_count_matches_allocations_tiny(base):
    c = lora.count(CFG, RANK)
    lm = lora.attach(base, RANK)
    assert c.lora_params == sum(np.size(a) for a in jax.tree.leaves(lm.adapters))
    assert c.lora_optimizer_bytes == _nbytes(lora.make_optimizer(lm.adapters).init(lm.adapters))
    params = trainable(base).params
    assert c.full_params == sum(np.size(a) for a in jax.tree.leaves(params))
    full = optim.make_optimizer(params, schedule=1e-4).init(params)
    assert c.full_optimizer_bytes == _nbytes(full)
    assert c.base_bytes == _nbytes(nnx.to_pure_dict(base.state))
    assert c.lora_train_bytes == c.base_bytes + 2 * 4 * c.lora_params + c.lora_optimizer_bytes
    assert c.full_train_bytes == 2 * 4 * c.full_params + c.full_optimizer_bytes


def test_count_flash_abstract():
    """V4-Flash, r 16 on wq_a / wq_b / wkv / wo_b of the 43 layers and the MTP block, counted
    from the config's dimensions (r (I + O) per projection) with no allocation."""
    cfg = v4jax.config.flash()
    c = lora.count(cfg, 16)
    d, q, hk, k, go = (
        cfg.dim,
        cfg.q_lora_rank,
        cfg.num_heads * cfg.head_dim,
        cfg.head_dim,
        (cfg.o_groups * cfg.o_lora_rank),
    )
    per_layer = 16 * ((d + q) + (q + hk) + (d + k) + (go + d))
    assert c.lora_params == per_layer * (cfg.num_layers + cfg.num_mtp_layers)
    n = v4jax.count_params(cfg)
    scored = cfg.num_layers - cfg.num_hash_layers + cfg.num_mtp_layers  # router biases: frozen
    assert c.full_params == n["total"] + n["mtp"] - scored * cfg.num_experts
    assert c.lora_optimizer_bytes == 2 * 4 * c.lora_params + 4  # two moments + the step count
    # V4 full fine-tuning: Muon (one float32 moment) on matrices, AdamW (two) on the rest.
    assert 4 * c.full_params < c.full_optimizer_bytes < 8 * c.full_params
    assert c.base_bytes < 160e9  # the release formats, about 1 byte per parameter
    assert c.param_ratio < 2e-4 and c.optimizer_ratio < 4e-4 and c.memory_ratio < 0.05


def test_targets_and_bad_input(base):
    assert lora.resolve_targets("attention") == ("wq_a", "wq_b", "wkv", "wo_b")
    assert lora.resolve_targets(["wo_b", "shared_experts"])[-1] == "shared_w3"
    with pytest.raises(ValueError, match="'wo_a' is not supported.*Attention.output"):
        lora.attach(base, 4, targets=("wq_a", "wo_a"))
    with pytest.raises(ValueError, match="LoRA target 'wq_c'"):
        lora.resolve_targets("wq_c")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        lora.attach(base, 0)
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        lora.attach(base, 4, alpha=0.0)
    lm = lora.attach(base, 4, targets="shared_experts,indexer", mtp=False)
    paths = set(lora._by_linear(lm.adapters))
    assert all(p[0] == "segments" for p in paths)  # mtp=False: no MTP adapters
    assert ("segments", 1, "blocks", 0, "attn", "indexer", "weights_proj") in paths
    assert ("segments", 0, "blocks", 0, "ffn", "shared_experts", "w2") in paths
    assert lora.count(CFG, 4, "shared_experts,indexer", mtp=False).lora_params == sum(
        np.size(a) for a in jax.tree.leaves(lm.adapters)
    )
