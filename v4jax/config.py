"""Model configuration: frozen dataclasses, release presets, `config.json` reading, layer plan.

Every field mirrors a key of the official release's `config.json` (HF names) and of the
reference's `inference/config.json` (`ModelArgs` names, given in each docstring). Values of the
presets are those of the release's `config.json`. Derived quantities are properties; the layer
plan (which layers are window-only / CSA / HCA / hash-routed, grouped into repeating segments that
are stacked and scanned) is computed by `layer_plan`.

`from_json` reads a release `config.json` strictly (its keys, as released): a key the model
needs is never filled in from a preset; a missing, mistyped or invalid one is a one-line
ConfigError in config.json's spelling, naming the file; unknown keys are a ConfigWarning.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import warnings
from collections.abc import Callable
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
    "ConfigWarning",
]


class ConfigError(ValueError):
    """A configuration value is invalid or missing; the one-line message names the field (in
    config.json's spelling when read from a file) and the file."""


class ConfigWarning(UserWarning):
    """config.json has keys this implementation does not know (they are ignored)."""


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


def _validate(c: Any, name: Callable[[str], str] = str) -> None:
    """Raises ConfigError for the first invalid field; `name` spells field names (from_dict:
    config.json's). `c` is a ModelConfig or any object with its fields (from_dict checks the
    values before building one)."""

    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{name(field)}={_short(getattr(c, field))}: {why}")

    for f in _POSITIVE:
        need(isinstance(getattr(c, f), int) and getattr(c, f) > 0, f, "must be a positive int")
    for f in _POSITIVE_REAL:
        need(getattr(c, f) > 0, f, "must be > 0")
    _validate_layers(c, need, name)
    _validate_widths(c, need, name)
    need(
        c.experts_per_token <= c.num_experts,
        "experts_per_token",
        f"must be <= {name('num_experts')}",
    )
    need(c.num_shared_experts == 1, "num_shared_experts", "the reference supports exactly 1")
    need(c.score_func == "sqrtsoftplus", "score_func", "only 'sqrtsoftplus' is implemented")
    need(c.expert_dtype in ("fp4", "fp8"), "expert_dtype", "must be 'fp4' or 'fp8'")
    need(c.weight_block == 128, "weight_block", "the release uses 128x128 blocks")
    need(c.hc_sinkhorn_iters >= 1, "hc_sinkhorn_iters", "must be >= 1")
    for f in ("bos_token_id", "eos_token_id"):
        need(0 <= getattr(c, f) < c.vocab_size, f, f"must be in [0, {name('vocab_size')})")
    need(c.original_seq_len >= 0, "original_seq_len", "must be >= 0 (0: no YaRN)")
    need(c.original_seq_len == 0 or c.rope_factor > 0, "rope_factor", "must be > 0")


def _validate_layers(c: Any, need: Callable, name: Callable[[str], str]) -> None:
    layers, mtp = name("num_layers"), name("num_mtp_layers")
    need(0 <= c.num_hash_layers <= c.num_layers, "num_hash_layers", f"must be in [0, {layers}]")
    need(c.num_mtp_layers in (0, 1), "num_mtp_layers", "only 0 or 1 MTP block is supported")
    n, ratios = c.num_layers + c.num_mtp_layers, c.compress_ratios
    need(len(ratios) == n, "compress_ratios", f"needs {layers} + {mtp} = {n} entries")
    ok = all(r in (0, 4, 128) for r in ratios)
    need(ok, "compress_ratios", "entries must be 0 (window), 4 (CSA) or 128 (HCA)")
    need(all(r == 0 for r in ratios[c.num_layers :]), "compress_ratios", "MTP entries must be 0")


def _validate_widths(c: Any, need: Callable, name: Callable[[str], str]) -> None:
    """Head and projection widths: RoPE split, FP8 (128) / FP4 (32) blocks, Hadamard."""
    ok = c.rope_head_dim % 2 == 0 and c.rope_head_dim <= c.head_dim
    need(ok, "rope_head_dim", f"must be even and <= {name('head_dim')}")
    ok = c.rope_head_dim <= c.index_head_dim
    need(ok, "index_head_dim", f"must be >= {name('rope_head_dim')}")
    need(c.head_dim % 64 == 0, "head_dim", "nope dims are FP8-simulated in 64-wide blocks")
    ok = c.index_head_dim % 32 == 0 and _pow2(c.index_head_dim)
    need(ok, "index_head_dim", "must be a power of two (Hadamard) and a multiple of 32 (FP4)")
    need(c.num_heads % c.o_groups == 0, "o_groups", f"must divide {name('num_heads')}")
    for f in ("dim", "q_lora_rank", "moe_inter_dim"):
        need(getattr(c, f) % 128 == 0, f, "FP8 activation blocks need a multiple of 128")
    ok = (c.num_heads * c.head_dim // c.o_groups) % 128 == 0
    ok = ok and (c.o_groups * c.o_lora_rank) % 128 == 0
    need(ok, "o_lora_rank", "output projection widths must be multiples of 128")


_POSITIVE = (
    "vocab_size dim num_layers num_heads head_dim q_lora_rank o_groups o_lora_rank window_size "
    "num_experts experts_per_token moe_inter_dim index_heads index_head_dim index_topk hc_mult "
    "max_position_embeddings"
).split()
_POSITIVE_REAL = "norm_eps hc_eps route_scale swiglu_limit rope_theta compress_rope_theta".split()


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (a message stays one readable line)."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


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
#
# Read strictly (the release's config.json keys): every key the architecture needs must be in
# the file, or follow from other keys (the layer count and the MTP count from `compress_ratios`);
# nothing falls back to a preset, because a missing key silently taking Flash's value gives a
# different model with no error. Keys the architecture fixes (`num_key_value_heads` 1, ...) may be
# absent but must have V4's value when present; HF bookkeeping keys are ignored; anything else is
# a ConfigWarning.

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
_ROPE_KEYS = {  # rope_scaling (YaRN) sub-keys -> fields
    "factor": "rope_factor",
    "original_max_position_embeddings": "original_seq_len",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
}
_HF_NAME = {ours: hf for hf, ours in _HF_KEYS.items()} | {
    ours: f"rope_scaling.{hf}" for hf, ours in _ROPE_KEYS.items()
}
_HF_NAME["weight_block"] = "quantization_config.weight_block_size"
_DERIVABLE = ("num_hidden_layers", "num_nextn_predict_layers")  # one from the other + ratios
_FIXED = {  # what V4 is; may be absent, refused if different
    "attention_bias": False,
    "hidden_act": "silu",
    "num_key_value_heads": 1,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
}
_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
_QUANT_KNOWN = {*_QUANT, "scale_fmt", "activation_scheme"}
_IGNORED = set(  # HF bookkeeping and training-only options: no effect on the model
    "_name_or_path architectures attention_dropout auto_map dtype initializer_range "
    "output_router_logits pad_token_id router_aux_loss_coef router_jitter_noise torch_dtype "
    "transformers_version use_cache".split()
)
_SPECIAL = {"model_type", "compress_ratios", "rope_scaling", "quantization_config"}
_KNOWN = _HF_KEYS.keys() | _FIXED.keys() | _IGNORED | _SPECIAL


def from_dict(d: Any, source: str = "config.json") -> ModelConfig:
    """Builds a config from the release's top-level `config.json` contents.

    Raises ConfigError (one line: `source`, the key in config.json's spelling, the problem) for
    a missing, mistyped or invalid key; warns (ConfigWarning) about unknown keys."""
    try:
        kw = _read_keys(d)
        _validate(types.SimpleNamespace(**_DEFAULTS | kw), lambda f: _HF_NAME.get(f, f))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    unknown = sorted(d.keys() - _KNOWN) + _unknown_sub(d, "rope_scaling", {*_ROPE_KEYS, "type"})
    unknown += _unknown_sub(d, "quantization_config", _QUANT_KNOWN)
    if unknown:
        msg = f"{source}: unknown key(s) {', '.join(unknown)} ignored (not used by DeepSeek-V4)"
        warnings.warn(msg, ConfigWarning, stacklevel=2)
    return ModelConfig(**kw)


def _read_keys(d: Any) -> dict[str, Any]:
    """config.json contents -> ModelConfig keyword arguments (checked, derived, typed)."""
    if not isinstance(d, dict):
        raise ConfigError(f"expected a JSON object, found {type(d).__name__}")
    if "model_type" not in d:
        hint = ""
        if {"n_layers", "dim"} & d.keys():
            hint = "; this looks like the reference's inference/config.json, use the top-level one"
        raise ConfigError(f"missing key model_type (expected 'deepseek_v4'){hint}")
    if d["model_type"] != "deepseek_v4":
        raise ConfigError(f"model_type={_short(d['model_type'])}: expected 'deepseek_v4'")
    required = [k for k in _HF_KEYS if k not in _DERIVABLE] + ["compress_ratios", "rope_scaling"]
    missing = [k for k in required if k not in d]
    if all(k not in d for k in _DERIVABLE):
        missing += ["num_hidden_layers or num_nextn_predict_layers"]
    if missing:
        raise ConfigError(f"{_missing(missing)} (DeepSeek-V4 needs every one; no defaults assumed)")
    for k, want in _FIXED.items():
        if k in d and d[k] != want:
            raise ConfigError(f"{k}={_short(d[k])}: DeepSeek-V4 has {json.dumps(want)}")
    ratios = d["compress_ratios"]
    if not isinstance(ratios, list) or not all(_is_int(r) for r in ratios):
        raise ConfigError(f"compress_ratios={_short(ratios)}: must be a list of integers")
    kw: dict[str, Any] = {"compress_ratios": tuple(ratios)}
    for hf, ours in _HF_KEYS.items():
        if hf in d:
            kw[ours] = _typed(hf, d[hf], _FIELD_TYPES[ours])
    _derive_counts(kw, len(ratios))
    kw |= _rope(d["rope_scaling"])
    if (q := d.get("quantization_config")) is not None:
        _check_quant(q)
    return kw


def _derive_counts(kw: dict[str, Any], n: int) -> None:
    """The missing one of num_hidden_layers / num_nextn_predict_layers: compress_ratios has one
    entry per layer plus one per MTP block."""
    for missing, given in (("num_layers", "num_mtp_layers"), ("num_mtp_layers", "num_layers")):
        if missing not in kw:
            kw[missing] = n - kw[given]
            if not (kw["num_layers"] >= 1 and kw["num_mtp_layers"] in (0, 1)):
                raise ConfigError(
                    f"{_HF_NAME[missing]}: missing, and compress_ratios' {n} entries minus "
                    f"{_HF_NAME[given]}={kw[given]} give {kw[missing]}, not a valid count"
                )


def _missing(keys: list[str]) -> str:
    return f"missing key{'s' if len(keys) > 1 else ''} {', '.join(keys)}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _typed(key: str, value: Any, kind: str) -> Any:
    """`value` as the field's type (int, float or str), or a ConfigError naming `key`."""
    if kind == "int" and _is_int(value):
        return value
    if kind == "float" and (_is_int(value) or isinstance(value, float)):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    want = {"int": "an integer", "float": "a number", "str": "a string"}[kind]
    raise ConfigError(f"{key}={_short(value)}: must be {want}")


def _rope(rs: Any) -> dict[str, Any]:
    """rope_scaling: null (no YaRN) or a complete YaRN dict -> fields."""
    if rs is None:
        return {"original_seq_len": 0}
    if not isinstance(rs, dict):
        raise ConfigError(f"rope_scaling={_short(rs)}: must be an object or null (no YaRN)")
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"rope_scaling.type={_short(kind)}: only 'yarn' is supported")
    missing = [f"rope_scaling.{k}" for k in _ROPE_KEYS if k not in rs]
    if missing:
        raise ConfigError(f"{_missing(missing)} (YaRN needs every one; null: no YaRN)")
    out = {}
    for hf, ours in _ROPE_KEYS.items():
        out[ours] = _typed(f"rope_scaling.{hf}", rs[hf], _FIELD_TYPES[ours])
    return out


def _check_quant(q: Any) -> None:
    if not isinstance(q, dict):
        raise ConfigError(f"quantization_config={_short(q)}: must be an object")
    for k, v in _QUANT.items():
        if q.get(k, v) != v:
            raise ConfigError(f"quantization_config.{k}={_short(q.get(k))}: expected {v!r}")
    if q.get("scale_fmt", "ue8m0") not in ("ue8m0", None):
        raise ConfigError(
            f"quantization_config.scale_fmt={_short(q['scale_fmt'])}: expected 'ue8m0'"
        )


def _unknown_sub(d: dict, key: str, known: set[str]) -> list[str]:
    sub = d.get(key)
    return [f"{key}.{k}" for k in sorted(sub.keys() - known)] if isinstance(sub, dict) else []


_FIELDS = dataclasses.fields(ModelConfig)
_FIELD_TYPES = {f.name: str(f.type) for f in _FIELDS}  # "int", "float", "str", ...
_DEFAULTS = {f.name: f.default for f in _FIELDS}  # only for fields no config.json key sets


def from_json(path: str | os.PathLike) -> ModelConfig:
    """Reads a release `config.json` (or the folder holding it); see `from_dict`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_dict(d, path)


def to_dict(c: ModelConfig) -> dict[str, Any]:
    """The release-style `config.json` contents for `c` (inverse of `from_dict`)."""
    d: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
    d |= _FIXED
    d["torch_dtype"] = "bfloat16"
    for hf, ours in _HF_KEYS.items():
        d[hf] = getattr(c, ours)
    d["compress_ratios"] = list(c.compress_ratios)
    d["rope_scaling"] = None  # no YaRN: explicit null (from_dict requires the key)
    if c.original_seq_len > 0:
        d["rope_scaling"] = {"type": "yarn"} | {hf: getattr(c, o) for hf, o in _ROPE_KEYS.items()}
    d["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3"}
    d["quantization_config"] |= {"quant_method": "fp8", "scale_fmt": "ue8m0"}
    d["quantization_config"]["weight_block_size"] = [128, 128]
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
