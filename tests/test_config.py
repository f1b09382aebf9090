import json

import pytest

import v4jax
from v4jax.config import Attn, ConfigError, LayerKind, from_dict, layer_plan, to_dict


def test_flash_preset_matches_release_values():
    c = v4jax.config.flash()
    assert (c.dim, c.num_layers, c.num_heads, c.q_lora_rank, c.o_groups) == (4096, 43, 64, 1024, 8)
    assert (c.num_experts, c.moe_inter_dim, c.route_scale, c.index_topk) == (256, 2048, 1.5, 512)
    assert len(c.compress_ratios) == 44 and c.compress_ratios[-1] == 0
    assert c.layer_ratios.count(4) == 21 and c.layer_ratios.count(128) == 20


def test_pro_preset_matches_release_values():
    c = v4jax.config.pro()
    shape = (c.dim, c.num_layers, c.num_heads, c.q_lora_rank, c.o_groups)
    assert shape == (7168, 61, 128, 1536, 16)
    assert (c.num_experts, c.moe_inter_dim, c.route_scale, c.index_topk) == (384, 3072, 2.5, 1024)
    assert len(c.compress_ratios) == 62
    assert c.layer_ratios.count(4) == 30 and c.layer_ratios.count(128) == 31


def test_layer_plan_groups_repeating_pairs():
    plan = layer_plan(v4jax.config.flash())
    assert [(s.start, s.repeats, len(s.kinds)) for s in plan] == [(0, 2, 1), (2, 1, 1), (3, 20, 2)]
    assert plan[0].kinds == (LayerKind(Attn.WINDOW, True),)
    assert plan[2].kinds == (LayerKind(Attn.HCA, False), LayerKind(Attn.CSA, False))
    assert sum(s.num_layers for s in layer_plan(v4jax.config.pro())) == 61


def test_fixture_config_reads(fixture_dir):
    c = v4jax.config.from_json(fixture_dir)
    assert c == v4jax.config.tiny()
    assert from_dict(to_dict(c)) == c


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_heads": 3}, "o_groups"),
        ({"compress_ratios": (0, 4, 64, 4, 0)}, "compress_ratios"),
        ({"compress_ratios": (0, 4, 128, 4)}, "compress_ratios"),
        ({"num_hash_layers": 9}, "num_hash_layers"),
        ({"experts_per_token": 99}, "experts_per_token"),
        ({"index_head_dim": 96}, "index_head_dim"),
        ({"dim": 0}, "dim"),
        ({"expert_dtype": "int4"}, "expert_dtype"),
    ],
)
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        v4jax.config.tiny(**change)


def test_bad_json_files(tmp_path, fixture_dir):
    d = json.loads((fixture_dir / "config.json").read_text())
    for key, value, field in [
        ("model_type", "llama", "model_type"),
        ("num_key_value_heads", 8, "num_key_value_heads"),
        ("rope_scaling", {"type": "linear", "factor": 2}, "rope_scaling"),
    ]:
        bad = dict(d, **{key: value})
        with pytest.raises(ConfigError, match=field):
            from_dict(bad)
    d2 = dict(d)
    del d2["compress_ratios"]
    with pytest.raises(ConfigError, match="compress_ratios"):
        from_dict(d2)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        v4jax.config.from_json(tmp_path)
