"""config.json is read strictly: refused, never guessed (issue 14, section 1).

Every key the architecture needs must be in the file or follow from other keys; a missing,
mistyped or invalid key is one short line naming the key in config.json's spelling and the
file; unknown keys are a ConfigWarning; the keys HF configs carry that change nothing are
silent. The key lists below are written from the official Flash / Pro top-level config.json,
not from the implementation.
"""

import json
import warnings

import pytest

import v4jax
from v4jax.checkpoint import orbax_io
from v4jax.config import ConfigError, ConfigWarning, from_dict, from_json, to_dict

# Keys the model needs, each with no possible default (official config.json).
REQUIRED = [
    "vocab_size", "hidden_size", "num_hash_layers", "num_attention_heads", "head_dim",
    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
    "routed_scaling_factor", "swiglu_limit", "scoring_func", "index_n_heads", "index_head_dim",
    "index_topk", "rope_theta", "compress_rope_theta", "hc_mult", "hc_sinkhorn_iters", "hc_eps",
    "rms_norm_eps", "expert_dtype", "bos_token_id", "eos_token_id", "max_position_embeddings",
    "compress_ratios", "rope_scaling", "model_type",
]  # fmt: skip
# Keys of the official files that change nothing here (HF bookkeeping, or V4's only value).
IGNORED_OR_FIXED = [
    "architectures", "attention_bias", "attention_dropout", "hidden_act", "initializer_range",
    "norm_topk_prob", "num_key_value_heads", "quantization_config", "tie_word_embeddings",
    "topk_method", "torch_dtype", "transformers_version", "use_cache",
]  # fmt: skip
OFFICIAL_KEYS = set(REQUIRED) | set(IGNORED_OR_FIXED) | {
    "num_hidden_layers", "num_nextn_predict_layers",
}  # fmt: skip


@pytest.fixture()
def official(fixture_dir) -> dict:
    return json.loads((fixture_dir / "config.json").read_text())


def _refused(d: dict, tmp_path, *needles: str) -> str:
    """from_json of `d` written to a file: a ConfigError of one short line naming the file
    and every needle."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as info:
        from_json(path)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 300, msg  # one readable line (was 28-570 KB)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_official_key_set_loads_silently(official, fixture_dir):
    """The bundled config (the official key set at tiny sizes) and to_dict of both release
    presets plus the HF-only keys load without a warning and equal the presets."""
    assert set(official) == OFFICIAL_KEYS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_json(fixture_dir) == v4jax.config.tiny()
        for preset in (v4jax.config.flash(), v4jax.config.pro()):
            d = to_dict(preset) | {k: official[k] for k in IGNORED_OR_FIXED}
            assert set(d) == OFFICIAL_KEYS
            assert from_dict(d) == preset


@pytest.mark.parametrize("key", REQUIRED)
def test_each_missing_key_is_refused(official, tmp_path, key):
    d = dict(official)
    del d[key]
    _refused(d, tmp_path, key)


def test_several_missing_keys_are_named_together(official, tmp_path):
    d = {k: v for k, v in official.items() if k not in ("hidden_size", "index_topk")}
    _refused(d, tmp_path, "hidden_size", "index_topk")


def test_layer_counts_follow_from_compress_ratios(official, tmp_path):
    """compress_ratios has one entry per layer plus one per MTP block: either count can be
    left out, not both; a derived count that makes no sense is refused."""
    for key in ("num_hidden_layers", "num_nextn_predict_layers"):
        d = dict(official)
        del d[key]
        assert from_dict(d) == v4jax.config.tiny()
    d = dict(official)
    del d["num_hidden_layers"], d["num_nextn_predict_layers"]
    _refused(d, tmp_path, "num_hidden_layers", "num_nextn_predict_layers")
    d = dict(official, num_hidden_layers=2)
    del d["num_nextn_predict_layers"]  # 5 ratios - 2 layers = 3 MTP blocks: impossible
    _refused(d, tmp_path, "num_nextn_predict_layers", "compress_ratios")
    _refused(dict(official, num_hidden_layers=3), tmp_path, "compress_ratios", "needs")


def test_rope_scaling_null_means_no_yarn(official, tmp_path):
    c = from_dict(dict(official, rope_scaling=None))
    assert c.original_seq_len == 0
    assert c == v4jax.config.tiny(original_seq_len=0)
    assert from_dict(to_dict(c)) == c  # to_dict writes the explicit null back
    for sub in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
        rs = dict(official["rope_scaling"])
        del rs[sub]
        _refused(dict(official, rope_scaling=rs), tmp_path, f"rope_scaling.{sub}")
    _refused(dict(official, rope_scaling={"type": "linear", "factor": 2}), tmp_path, "yarn")
    _refused(dict(official, rope_scaling=16), tmp_path, "rope_scaling")


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("hidden_size", "256", "hidden_size='256': must be an integer"),
        ("hidden_size", 256.0, "hidden_size=256.0: must be an integer"),
        ("index_topk", True, "index_topk=True"),
        ("routed_scaling_factor", "1.5", "routed_scaling_factor='1.5': must be a number"),
        ("scoring_func", 1, "scoring_func=1: must be a string"),
        ("compress_ratios", [0, 4, "x", 4, 0], "compress_ratios"),
        ("hidden_size", 0, "hidden_size=0"),
        ("num_attention_heads", 3, "must divide num_attention_heads"),
        ("num_experts_per_tok", 9, "must be <= n_routed_experts"),
        ("scoring_func", "softmax", "scoring_func='softmax'"),
        ("eos_token_id", 5000, "must be in [0, vocab_size)"),
        ("rms_norm_eps", 0, "rms_norm_eps=0.0: must be > 0"),
        ("num_key_value_heads", 8, "num_key_value_heads=8"),
        ("tie_word_embeddings", True, "tie_word_embeddings=True"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("model_type", "llama", "model_type='llama'"),
        ("quantization_config", {"quant_method": "int8"}, "quantization_config.quant_method"),
    ],
)
def test_bad_value_named_in_config_json_spelling(official, tmp_path, key, value, needle):
    _refused(dict(official, **{key: value}), tmp_path, needle)


def test_a_long_bad_value_stays_one_short_line(official, tmp_path):
    _refused(dict(official, hidden_size="x" * 100_000), tmp_path, "hidden_size=")


def test_not_an_object_and_reference_inference_config(tmp_path, fixture_dir):
    _refused([1, 2], tmp_path, "JSON object")
    inference = json.loads((fixture_dir / "inference" / "config.json").read_text())
    _refused(inference, tmp_path, "model_type", "inference/config.json")


def test_unknown_keys_warn_by_name(official):
    d = dict(official, my_flag=1, another=2)
    d["rope_scaling"] = dict(official["rope_scaling"], mscale=1.0)
    with pytest.warns(ConfigWarning) as rec:
        assert from_dict(d) == v4jax.config.tiny()
    (w,) = rec
    assert "another, my_flag, rope_scaling.mscale" in str(w.message)


def test_hf_bookkeeping_keys_are_silent(official):
    d = dict(official, _name_or_path="x", dtype="bfloat16", pad_token_id=None)
    d |= {"output_router_logits": False, "router_aux_loss_coef": 0.001}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_dict(d) == v4jax.config.tiny()


def test_old_orbax_marker_without_rope_scaling_reads(tmp_path):
    """Markers written before rope_scaling was required left it out exactly when there was
    no YaRN; they still read (and anything else missing is still refused)."""
    cfg = v4jax.config.tiny(original_seq_len=0)
    d = to_dict(cfg)
    del d["rope_scaling"]
    marker = {"format": orbax_io.FORMAT, "version": orbax_io.VERSION, "dtype": "keep"}
    (tmp_path / orbax_io.MARKER).write_text(json.dumps(marker | {"config": d}))
    assert orbax_io.read_marker(tmp_path).config == cfg
    del d["hidden_size"]
    (tmp_path / orbax_io.MARKER).write_text(json.dumps(marker | {"config": d}))
    with pytest.raises(v4jax.CheckpointError, match="corrupted marker .*hidden_size"):
        orbax_io.read_marker(tmp_path)
