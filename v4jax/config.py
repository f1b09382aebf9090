"""Model configuration: frozen dataclasses, release presets, `config.json` reading, layer plan.

Every field mirrors a key of the official release's `config.json` (HF names) and of the
reference's `inference/config.json` (`ModelArgs` names, given in each docstring). Values of the
presets are those of `v4-architecture.md` section 1. Derived quantities are properties; the layer
plan (which layers are window-only / CSA / HCA / hash-routed, grouped into repeating segments that
are stacked and scanned) is computed by `layer_plan`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any

__all__ = [
    "Attn",
    "LayerKind",
    "ModelConfig",
    "Segment",
    "flash",
    "from_json",
    "layer_plan",
    "pro",
    "small",
    "tiny",
    "ConfigError",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class Attn(enum.IntEnum):
    """Attention type of a layer, by compression ratio."""

    WINDOW = 0  # sliding window only (r = 0)
    CSA = 4  # compressed sparse attention: overlapping ratio-4 pooling + lightning indexer
    HCA = 128  # heavily compressed attention: ratio-128 pooling, dense over entries


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """Structural identity of a layer: layers with equal kinds have equal parameter shapes."""

    attn: Attn
    hash_routed: bool


@dataclasses.dataclass(frozen=True)
class Segment:
    """`repeats` consecutive copies of the unit `kinds` starting at layer `start`."""

    start: int
    kinds: tuple[LayerKind, ...]
    repeats: int

    @property
    def num_layers(self) -> int:
        return len(self.kinds) * self.repeats


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """DeepSeek-V4 hyper-parameters (HF `config.json` name first, `ModelArgs` name second)."""

    vocab_size: int = 129280  # vocab_size
    dim: int = 4096  # hidden_size / dim
    num_layers: int = 43  # num_hidden_layers / n_layers
    num_hash_layers: int = 3  # num_hash_layers / n_hash_layers: layers < this use tid2eid routing
    num_mtp_layers: int = 1  # num_nextn_predict_layers / n_mtp_layers
    num_heads: int = 64  # num_attention_heads / n_heads
    head_dim: int = 512  # head_dim: K = V head dim (one shared KV head)
    rope_head_dim: int = 64  # qk_rope_head_dim: the LAST rope_head_dim dims of a head are rotary
    q_lora_rank: int = 1024  # q_lora_rank
    o_groups: int = 8  # o_groups: groups of the grouped low-rank output projection
    o_lora_rank: int = 1024  # o_lora_rank: per-group rank
    window_size: int = 128  # sliding_window / window_size
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)  # per layer + per MTP
    # MoE
    num_experts: int = 256  # n_routed_experts
    num_shared_experts: int = 1  # n_shared_experts (the reference asserts 1)
    experts_per_token: int = 6  # num_experts_per_tok / n_activated_experts
    moe_inter_dim: int = 2048  # moe_intermediate_size / moe_inter_dim (routed and shared)
    route_scale: float = 1.5  # routed_scaling_factor / route_scale
    swiglu_limit: float = 10.0  # swiglu_limit: clamp of the SwiGLU activations
    score_func: str = "sqrtsoftplus"  # scoring_func
    # Lightning indexer
    index_heads: int = 64  # index_n_heads
    index_head_dim: int = 128  # index_head_dim
    index_topk: int = 512  # index_topk
    # RoPE
    rope_theta: float = 10000.0  # base of window-only (r = 0) layers and the MTP block
    compress_rope_theta: float = 160000.0  # base of compressed (r > 0) layers
    rope_factor: float = 16.0  # rope_scaling.factor (YaRN, r > 0 layers only)
    original_seq_len: int = 65536  # rope_scaling.original_max_position_embeddings
    beta_fast: int = 32  # rope_scaling.beta_fast
    beta_slow: int = 1  # rope_scaling.beta_slow
    # mHC
    hc_mult: int = 4  # hc_mult: residual streams
    hc_sinkhorn_iters: int = 20  # hc_sinkhorn_iters
    hc_eps: float = 1e-6  # hc_eps
    norm_eps: float = 1e-6  # rms_norm_eps
    # Weight formats
    expert_dtype: str = "fp4"  # expert_dtype: "fp4" (packed e2m1) or "fp8"
    weight_block: int = 128  # quantization_config.weight_block_size
    bos_token_id: int = 0
    eos_token_id: int = 1
    max_position_embeddings: int = 1048576

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived ----
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def layer_ratios(self) -> tuple[int, ...]:
        """Compression ratio of each main-stack layer (without the trailing MTP entries)."""
        return self.compress_ratios[: self.num_layers]

    @property
    def mtp_ratios(self) -> tuple[int, ...]:
        return self.compress_ratios[self.num_layers :]

    @property
    def mix_hc(self) -> int:
        """Rows of an mHC site's projection: pre (n) + post (n) + comb (n * n)."""
        return (2 + self.hc_mult) * self.hc_mult

    def layer_kind(self, layer: int) -> LayerKind:
        return LayerKind(Attn(self.layer_ratios[layer]), layer < self.num_hash_layers)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _validate(c: ModelConfig) -> None:
    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{field}={getattr(c, field)!r}: {why}")

    for f in (
        "vocab_size",
        "dim",
        "num_layers",
        "num_heads",
        "head_dim",
        "q_lora_rank",
        "o_groups",
        "o_lora_rank",
        "window_size",
        "num_experts",
        "experts_per_token",
        "moe_inter_dim",
        "index_heads",
        "index_head_dim",
        "hc_mult",
    ):
        need(isinstance(getattr(c, f), int) and getattr(c, f) > 0, f, "must be a positive int")
    need(0 <= c.num_hash_layers <= c.num_layers, "num_hash_layers", "must be in [0, num_layers]")
    need(c.num_mtp_layers in (0, 1), "num_mtp_layers", "only 0 or 1 MTP block is supported")
    need(
        len(c.compress_ratios) == c.num_layers + c.num_mtp_layers,
        "compress_ratios",
        f"needs num_layers + num_mtp_layers = {c.num_layers + c.num_mtp_layers} entries",
    )
    need(
        all(r in (0, 4, 128) for r in c.compress_ratios),
        "compress_ratios",
        "entries must be 0 (window), 4 (CSA) or 128 (HCA)",
    )
    need(all(r == 0 for r in c.mtp_ratios), "compress_ratios", "MTP entries must be 0")
    need(
        c.rope_head_dim % 2 == 0 and c.rope_head_dim <= c.head_dim,
        "rope_head_dim",
        "must be even and <= head_dim",
    )
    need(c.rope_head_dim <= c.index_head_dim, "index_head_dim", "must be >= rope_head_dim")
    need(c.head_dim % 64 == 0, "head_dim", "nope dims are FP8-simulated in 64-wide blocks")
    need(
        c.index_head_dim % 32 == 0 and _pow2(c.index_head_dim),
        "index_head_dim",
        "must be a power of two (Hadamard) and a multiple of 32 (FP4 blocks)",
    )
    need(c.num_heads % c.o_groups == 0, "o_groups", "must divide num_heads")
    need(c.experts_per_token <= c.num_experts, "experts_per_token", "must be <= num_experts")
    need(c.num_shared_experts == 1, "num_shared_experts", "the reference supports exactly 1")
    need(c.score_func == "sqrtsoftplus", "score_func", "only 'sqrtsoftplus' is implemented")
    need(c.expert_dtype in ("fp4", "fp8"), "expert_dtype", "must be 'fp4' or 'fp8'")
    need(c.weight_block == 128, "weight_block", "the release uses 128x128 blocks")
    need(c.dim % 128 == 0, "dim", "FP8 activation blocks need a multiple of 128")
    need(c.q_lora_rank % 128 == 0, "q_lora_rank", "FP8 activation blocks need a multiple of 128")
    need(c.moe_inter_dim % 128 == 0, "moe_inter_dim", "FP8 activation blocks: multiple of 128")
    need(
        (c.num_heads * c.head_dim // c.o_groups) % 128 == 0
        and (c.o_groups * c.o_lora_rank) % 128 == 0,
        "o_lora_rank",
        "output projection widths must be multiples of 128",
    )
    need(c.hc_sinkhorn_iters >= 1, "hc_sinkhorn_iters", "must be >= 1")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ---------------------------------------------------------------------------------------------
# Presets


def flash() -> ModelConfig:
    """DeepSeek-V4-Flash (284B total / 13B active), values of the release's config.json."""
    return ModelConfig()


def pro() -> ModelConfig:
    """DeepSeek-V4-Pro (1.6T total / 49B active)."""
    return ModelConfig(
        dim=7168,
        num_layers=61,
        num_heads=128,
        q_lora_rank=1536,
        o_groups=16,
        num_experts=384,
        moe_inter_dim=3072,
        route_scale=2.5,
        index_topk=1024,
        compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
    )


def small(**changes: Any) -> ModelConfig:
    """A ~38M-parameter V4 with the official 129,280-token vocabulary and every component on
    (window-only, CSA with its lightning indexer, HCA, hash-routed and scored MoE, mHC, the MTP
    block): the CPU training demo (`scripts/train.py --preset small`) and the model speculative
    decoding is measured on. Most parameters are the embedding and the head (2 x 16.5M)."""
    base: dict[str, Any] = dict(
        vocab_size=129280,
        dim=128,
        num_layers=4,
        num_hash_layers=1,
        num_heads=4,
        head_dim=128,
        rope_head_dim=64,
        q_lora_rank=128,
        o_groups=2,
        o_lora_rank=64,
        window_size=64,
        compress_ratios=(0, 4, 128, 4, 0),
        num_experts=8,
        experts_per_token=2,
        moe_inter_dim=256,
        index_heads=4,
        index_head_dim=64,
        index_topk=16,
        original_seq_len=256,
        max_position_embeddings=4096,
    )
    base.update(changes)
    return ModelConfig(**base)


def tiny(*, compress_ratios: tuple[int, ...] = (0, 4, 128, 4, 0), **changes: Any) -> ModelConfig:
    """A few-MB model with every layer type; the shapes of the `v4-tiny-flash` fixture.

    `window_size` 16 and `original_seq_len` 64 make window wrap-around and YaRN visible at
    short lengths. Override any field (e.g. `num_hash_layers`, `index_topk`) for test variants.
    """
    base: dict[str, Any] = dict(
        vocab_size=1024,
        dim=256,
        num_layers=len(compress_ratios) - 1,
        num_hash_layers=2,
        num_heads=4,
        head_dim=128,
        rope_head_dim=64,
        q_lora_rank=128,
        o_groups=2,
        o_lora_rank=128,
        window_size=16,
        compress_ratios=tuple(compress_ratios),
        num_experts=8,
        experts_per_token=2,
        moe_inter_dim=128,
        index_heads=4,
        index_head_dim=64,
        index_topk=8,
        original_seq_len=64,
        max_position_embeddings=1024,
    )
    base.update(changes)
    return ModelConfig(**base)


# ---------------------------------------------------------------------------------------------
# config.json

_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "num_layers",
    "num_hash_layers": "num_hash_layers",
    "num_nextn_predict_layers": "num_mtp_layers",
    "num_attention_heads": "num_heads",
    "head_dim": "head_dim",
    "qk_rope_head_dim": "rope_head_dim",
    "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "sliding_window": "window_size",
    "n_routed_experts": "num_experts",
    "n_shared_experts": "num_shared_experts",
    "num_experts_per_tok": "experts_per_token",
    "moe_intermediate_size": "moe_inter_dim",
    "routed_scaling_factor": "route_scale",
    "swiglu_limit": "swiglu_limit",
    "scoring_func": "score_func",
    "index_n_heads": "index_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "rms_norm_eps": "norm_eps",
    "expert_dtype": "expert_dtype",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "max_position_embeddings": "max_position_embeddings",
}


def from_dict(d: dict[str, Any]) -> ModelConfig:
    """Builds a config from the release's top-level `config.json` contents."""
    if d.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ConfigError(f"model_type={d.get('model_type')!r}: expected 'deepseek_v4'")
    kw: dict[str, Any] = {ours: d[hf] for hf, ours in _HF_KEYS.items() if hf in d}
    if "compress_ratios" not in d:
        raise ConfigError("compress_ratios: missing (one entry per layer plus one per MTP)")
    kw["compress_ratios"] = tuple(int(r) for r in d["compress_ratios"])
    kw.setdefault("num_hash_layers", 0)
    kw.setdefault("expert_dtype", "fp8")  # no key: experts are FP8 like the other linears
    if (rs := d.get("rope_scaling")) is not None:
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise ConfigError(f"rope_scaling.type={kind!r}: only 'yarn' is supported")
        kw.update(
            rope_factor=float(rs["factor"]),
            beta_fast=rs.get("beta_fast", 32),
            beta_slow=rs.get("beta_slow", 1),
            original_seq_len=int(rs["original_max_position_embeddings"]),
        )
    else:
        kw["original_seq_len"] = 0
    if (q := d.get("quantization_config")) is not None:
        _check_quant(q)
    if d.get("num_key_value_heads", 1) != 1:
        raise ConfigError(f"num_key_value_heads={d['num_key_value_heads']}: V4 has one KV head")
    try:
        return ModelConfig(**kw)
    except TypeError as e:  # a wrongly typed value
        raise ConfigError(str(e)) from None


def _check_quant(q: dict[str, Any]) -> None:
    expect = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    for k, v in expect.items():
        if q.get(k, v) != v:
            raise ConfigError(f"quantization_config.{k}={q.get(k)!r}: expected {v!r}")
    if q.get("scale_fmt", "ue8m0") not in ("ue8m0", None):
        raise ConfigError(f"quantization_config.scale_fmt={q['scale_fmt']!r}: expected 'ue8m0'")


def from_json(path: str | os.PathLike) -> ModelConfig:
    """Reads a release `config.json` (or the folder holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_dict(d)


def to_dict(c: ModelConfig) -> dict[str, Any]:
    """The release-style `config.json` contents for `c` (inverse of `from_dict`)."""
    d: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "attention_bias": False,
        "hidden_act": "silu",
        "num_key_value_heads": 1,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
    }
    for hf, ours in _HF_KEYS.items():
        d[hf] = getattr(c, ours)
    d["compress_ratios"] = list(c.compress_ratios)
    if c.original_seq_len > 0:  # no YaRN: no rope_scaling key (as from_dict reads it)
        d["rope_scaling"] = {
            "type": "yarn",
            "factor": c.rope_factor,
            "beta_fast": c.beta_fast,
            "beta_slow": c.beta_slow,
            "original_max_position_embeddings": c.original_seq_len,
        }
    d["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }
    return d


# ---------------------------------------------------------------------------------------------
# Layer plan


def layer_plan(c: ModelConfig) -> tuple[Segment, ...]:
    """Groups the main stack into segments of a repeated unit (1 or 2 layer kinds).

    Flash: [L0-1 window+hash] x2, [L2 CSA+hash], [(HCA, CSA)] x20. Each segment is stacked and
    scanned, so compile time does not grow with depth.
    """
    kinds = [c.layer_kind(i) for i in range(c.num_layers)]
    segments, i = [], 0
    while i < len(kinds):
        best = Segment(i, (kinds[i],), _repeats(kinds, i, 1))
        if i + 1 < len(kinds):
            pair = Segment(i, (kinds[i], kinds[i + 1]), _repeats(kinds, i, 2))
            if pair.repeats > 1 and pair.num_layers > best.num_layers:
                best = pair
        segments.append(best)
        i += best.num_layers
    return tuple(segments)


def _repeats(kinds: list[LayerKind], i: int, unit: int) -> int:
    n = 0
    while (
        i + (n + 1) * unit <= len(kinds)
        and kinds[i + n * unit : i + (n + 1) * unit] == kinds[i : i + unit]
    ):
        n += 1
    return n
