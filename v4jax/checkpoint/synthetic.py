"""Random checkpoints in the exact on-disk layout of the official DeepSeek-V4 release.

`release_tensor_specs`: every release tensor for a config (names as in the release's safetensors;
no `model.` prefix, `mtp.0.*` included) -> (safetensors dtype, shape). Quantised weights are encoded
with the one release recipe, `v4jax.numerics.quantize` (its four functions are re-exported here
for existing callers). `random_release_tensors` / `write_release_checkpoint` follow the
`v4-tiny-flash` README recipe; each tensor has its own generator seeded by (seed, crc32(name)),
so writers can stream. Never call the generators for full-size configs in tests (Flash is
~150 GB).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from v4jax.checkpoint.safetensors import numpy_dtype, write_index, write_safetensors
from v4jax.config import ModelConfig, to_dict
from v4jax.numerics.quantize import (
    FP4_BLOCK,
    FP8_BLOCK,
    dequantize_fp4,
    dequantize_fp8_blocks,
    quantize_fp4_rows,
    quantize_fp8_blocks,
)

__all__ = [
    "Spec",
    "dequantize_fp4",
    "dequantize_fp8_blocks",
    "iter_random_release_tensors",
    "quantize_fp4_rows",
    "quantize_fp8_blocks",
    "random_release_tensors",
    "release_tensor_specs",
    "shard_of",
    "write_release_checkpoint",
]

Spec = tuple[str, tuple[int, ...]]  # (safetensors dtype string, shape)

# ----------------------------------------------------------------------------- tensor inventory


def _fp8(specs: dict[str, Spec], name: str, out: int, inp: int, fp4: bool = False) -> None:
    """A quantised linear: FP8 128x128 blocks, or packed FP4 with per-32 scales."""
    specs[f"{name}.weight"] = ("I8", (out, inp // 2)) if fp4 else ("F8_E4M3", (out, inp))
    specs[f"{name}.scale"] = (
        "F8_E8M0",
        (out, inp // FP4_BLOCK) if fp4 else (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)),
    )


def _compressor(specs: dict[str, Spec], p: str, cfg: ModelConfig, ratio: int, hd: int) -> None:
    coff = 2 if ratio == 4 else 1  # r = 4 pools overlapping blocks: two series per token
    for w in ("wkv", "wgate"):
        specs[f"{p}.{w}.weight"] = ("BF16", (coff * hd, cfg.dim))
    specs[f"{p}.ape"], specs[f"{p}.norm.weight"] = ("F32", (ratio, coff * hd)), ("BF16", (hd,))


def _block(specs: dict[str, Spec], cfg: ModelConfig, p: str, ratio: int, hashed: bool) -> None:
    """Every tensor of one block (main layer `layers.i` or the MTP block `mtp.0`)."""
    d, hd, inter = cfg.dim, cfg.head_dim, cfg.moe_inter_dim
    a = f"{p}.attn"
    _fp8(specs, f"{a}.wq_a", cfg.q_lora_rank, d)
    specs[f"{a}.q_norm.weight"] = ("BF16", (cfg.q_lora_rank,))
    _fp8(specs, f"{a}.wq_b", cfg.num_heads * hd, cfg.q_lora_rank)
    _fp8(specs, f"{a}.wkv", hd, d)
    specs[f"{a}.kv_norm.weight"] = ("BF16", (hd,))
    _fp8(specs, f"{a}.wo_a", cfg.o_groups * cfg.o_lora_rank, cfg.num_heads * hd // cfg.o_groups)
    _fp8(specs, f"{a}.wo_b", d, cfg.o_groups * cfg.o_lora_rank)
    specs[f"{a}.attn_sink"] = ("F32", (cfg.num_heads,))
    if ratio > 0:
        _compressor(specs, f"{a}.compressor", cfg, ratio, hd)
    if ratio == 4:
        _fp8(specs, f"{a}.indexer.wq_b", cfg.index_heads * cfg.index_head_dim, cfg.q_lora_rank)
        specs[f"{a}.indexer.weights_proj.weight"] = ("BF16", (cfg.index_heads, d))
        _compressor(specs, f"{a}.indexer.compressor", cfg, 4, cfg.index_head_dim)
    for site in ("attn", "ffn"):
        specs[f"{p}.{site}_norm.weight"] = ("BF16", (d,))
        _hc(specs, cfg, f"{p}.hc_{site}", cfg.mix_hc, 3)
    f = f"{p}.ffn"
    specs[f"{f}.gate.weight"] = ("BF16", (cfg.num_experts, d))
    if hashed:
        specs[f"{f}.gate.tid2eid"] = ("I64", (cfg.vocab_size, cfg.experts_per_token))
    else:
        specs[f"{f}.gate.bias"] = ("F32", (cfg.num_experts,))
    fp4 = cfg.expert_dtype == "fp4"
    for e in ["shared_experts", *(f"experts.{e}" for e in range(cfg.num_experts))]:
        for w, (o, i) in (("w1", (inter, d)), ("w2", (d, inter)), ("w3", (inter, d))):
            _fp8(specs, f"{f}.{e}.{w}", o, i, fp4=fp4 and e != "shared_experts")


def _hc(specs: dict[str, Spec], cfg: ModelConfig, p: str, rows: int, nscale: int) -> None:
    """An mHC site `{p}_fn` [rows, hc*dim], `{p}_base` [rows], `{p}_scale` [nscale] (all F32)."""
    specs[f"{p}_fn"] = ("F32", (rows, cfg.hc_mult * cfg.dim))
    specs[f"{p}_base"] = ("F32", (rows,))
    specs[f"{p}_scale"] = ("F32", (nscale,))


def release_tensor_specs(cfg: ModelConfig) -> dict[str, Spec]:
    """Every release tensor for `cfg` -> (safetensors dtype, shape). Order: `embed`, `layers.*`,
    `norm`, `head`, `hc_head_*`, `mtp.0.*`; a quantised `.weight` precedes its `.scale`."""
    specs: dict[str, Spec] = {"embed.weight": ("BF16", (cfg.vocab_size, cfg.dim))}
    for i in range(cfg.num_layers):
        _block(specs, cfg, f"layers.{i}", cfg.layer_ratios[i], i < cfg.num_hash_layers)
    specs["norm.weight"] = ("BF16", (cfg.dim,))
    specs["head.weight"] = ("BF16", (cfg.vocab_size, cfg.dim))
    _hc(specs, cfg, "hc_head", cfg.hc_mult, 1)
    for m, ratio in enumerate(cfg.mtp_ratios):
        p = f"mtp.{m}"
        _fp8(specs, f"{p}.e_proj", cfg.dim, cfg.dim)
        _fp8(specs, f"{p}.h_proj", cfg.dim, cfg.dim)
        for n in ("enorm", "hnorm", "norm"):
            specs[f"{p}.{n}.weight"] = ("BF16", (cfg.dim,))
        _hc(specs, cfg, f"{p}.hc_head", cfg.hc_mult, 1)
        _block(specs, cfg, p, ratio, hashed=False)
    return specs


# ----------------------------------------------------------------------------- random weights

CLAMP_ROW_NORM = 40.0  # expert unit 0 up row / unit 1 gate row: |pre-activation| often > 10
CLAMP_DOWN_STD = 0.001  # their down-projection columns are kept small


def _linear_f32(base: str, out: int, inp: int, rng: np.random.Generator, fp4: bool) -> np.ndarray:
    """A bf16-valued random matrix for the quantised linear `base` (README recipe)."""
    std = 0.02 if base.endswith(("wo_b", ".w2")) else 0.05
    w = rng.standard_normal((out, inp), dtype=np.float32) * std
    if fp4:  # every row scaled by 2^U(-0.5, 0.5)
        w *= np.exp2(rng.uniform(-0.5, 0.5, (out, 1))).astype(np.float32)
    else:  # every 128x128 block scaled by 2^U(-1, 1)
        f = np.exp2(rng.uniform(-1.0, 1.0, (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK))))
        w *= np.repeat(np.repeat(f, FP8_BLOCK, 0), FP8_BLOCK, 1)[:out, :inp].astype(np.float32)
    if "experts" in base:  # routed and shared experts: two SwiGLU clamp units
        leaf = base.rsplit(".", 1)[-1]
        if leaf in ("w1", "w3"):  # w3 (up) row 0 and w1 (gate) row 1 get norm 40
            row = rng.standard_normal(inp)
            w[0 if leaf == "w3" else 1] = row * (CLAMP_ROW_NORM / np.linalg.norm(row))
        else:
            w[:, :2] = rng.standard_normal((out, 2)) * CLAMP_DOWN_STD
    return w.astype(ml_dtypes.bfloat16).astype(np.float32)


# Dense (non-quantised) tensors: first matching regex -> ("normal", mean, std) | ("uniform", lo, hi)
_DENSE_RULES: list[tuple[str, tuple[str, float, float]]] = [
    (r"^embed\.weight$", ("normal", 0.0, 1.0)),
    (r"^head\.weight$", ("normal", 0.0, 0.1)),
    (r"norm\.weight$", ("normal", 1.0, 0.1)),
    (r"hc_\w+_fn$", ("normal", 0.0, 0.02)),
    (r"hc_\w+_base$", ("normal", 0.0, 0.5)),
    (r"hc_\w+_scale$", ("uniform", 0.5, 1.5)),
    (r"attn_sink$", ("normal", 1.0, 1.0)),
    (r"\.ape$", ("normal", 0.0, 0.3)),
    (r"gate\.bias$", ("normal", 0.0, 0.1)),
    (r"", ("normal", 0.0, 0.05)),  # compressor wkv / wgate, indexer weights_proj, gate.weight
]


def _dense(
    name: str, dtype: str, shape: tuple[int, ...], cfg: ModelConfig, rng: np.random.Generator
) -> np.ndarray:
    """A BF16 / F32 / I64 tensor following the README recipe."""
    if name.endswith("tid2eid"):  # distinct experts per row, uniform
        order = rng.random((shape[0], cfg.num_experts)).argsort(axis=1)
        return order[:, : shape[1]].astype(np.int64)
    kind, a, b = next(d for pat, d in _DENSE_RULES if re.search(pat, name))
    x = rng.normal(a, b, shape) if kind == "normal" else rng.uniform(a, b, shape)
    return x.astype(np.float32).astype(numpy_dtype(dtype))


def iter_random_release_tensors(cfg: ModelConfig, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for every tensor of `release_tensor_specs(cfg)`, in that order."""
    specs = release_tensor_specs(cfg)
    for name, (dtype, shape) in specs.items():
        if name.endswith(".scale"):
            continue  # emitted with its weight
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        if dtype in ("F8_E4M3", "I8"):
            base = name.removesuffix(".weight")
            fp4 = dtype == "I8"
            w = _linear_f32(base, shape[0], shape[1] * (2 if fp4 else 1), rng, fp4)
            q, s = quantize_fp4_rows(w) if fp4 else quantize_fp8_blocks(w)
            assert (q.shape, s.shape) == (shape, specs[f"{base}.scale"][1]), name
            yield name, q
            yield f"{base}.scale", s
        else:
            yield name, _dense(name, dtype, shape, cfg, rng)


def random_release_tensors(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """All tensors of a random release checkpoint for `cfg` (tiny configs only)."""
    return dict(iter_random_release_tensors(cfg, seed))


def shard_of(name: str, cfg: ModelConfig, shards: int) -> int:
    """0-based shard of `name`: embed + contiguous layer groups; top tensors + MTP go last."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) * shards // cfg.num_layers
    return 0 if name.startswith("embed.") else shards - 1


def write_release_checkpoint(
    cfg: ModelConfig, folder: str | os.PathLike[str], seed: int, *, shards: int = 2
) -> Path:
    """Writes `config.json`, `model-0000K-of-0000N.safetensors` and the index into `folder`.

    Streams: only one shard's tensors are held in memory at a time. Returns the folder.
    """
    if not 1 <= shards <= cfg.num_layers:
        raise ValueError(f"shards={shards}: must be in [1, num_layers={cfg.num_layers}]")
    (folder := Path(folder)).mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map: dict[str, str] = {}
    total, current, pending = 0, 0, {}

    def flush_until(k: int) -> None:  # writes shards current .. k-1
        nonlocal current, pending
        while current < k:
            write_safetensors(folder / files[current], pending, metadata={"format": "pt"})
            current, pending = current + 1, {}

    for name, arr in iter_random_release_tensors(cfg, seed):
        flush_until(k := shard_of(name, cfg, shards))
        pending[name], weight_map[name] = arr, files[k]
        total += arr.nbytes
    flush_until(shards)
    write_index(folder, weight_map, total)
    return folder


def large_config() -> ModelConfig:
    """A few-layer config with big tensors for memory and throughput checks: 2 layers + MTP,
    dim 2048, 96 FP4 experts, vocab 65536; 1.55 GB of tensors, the largest (embed, head)
    256 MiB each."""
    from v4jax.config import tiny

    return tiny(
        compress_ratios=(0, 128, 0),
        num_hash_layers=1,
        dim=2048,
        vocab_size=65536,
        num_experts=96,
        moe_inter_dim=1024,
        q_lora_rank=512,
        num_heads=8,
        head_dim=256,
        o_groups=2,
        o_lora_rank=512,
    )
