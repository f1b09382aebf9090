"""Hugging Face transformers `DeepseekV4ForCausalLM` as a CPU oracle for release folders.

transformers (>= 5.23) loads a release folder as shipped: its `deepseek_v4` conversion mapping
renames the release tensors (`layers.i.attn.wq_a.weight` -> `model.layers.i.self_attn.q_a_proj.
weight`, ...) and its fine-grained FP8 quantizer, forced here into `dequantize=True` mode (the
mode it falls back to on a machine without a GPU), dequantises the FP8 / packed-FP4 weights to
bf16 while loading. That is exact (e4m3 / e2m1 times a power of two fits bf16), and so is the
`model.float()` that follows for `dtype="float32"`. `_check_weights` verifies both against an
independent numpy dequantisation of every tensor in the folder.

HF implements the architecture but none of the reference's QAT simulations (no FP8/FP4
activation quant-dequant, no Hadamard). It ignores `mtp.*` (no MTP block). `hf_logits` runs full
sequence forwards (`use_cache=False`) and returns logits for every position.

Release config keys: HF reads `compress_ratios` (-> `layer_types`, the MTP entry cut off),
`num_hash_layers` (-> `mlp_layer_types`), `qk_rope_head_dim` (-> `partial_rotary_factor`),
`expert_dtype` (moved into `quantization_config`) and `rope_scaling` (YaRN with the release's
`factor`, `original_max_position_embeddings` only for the correction range, `attention_factor`
forced to 1.0, compressed layers only), so the release `config.json` needs no extra keys.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import torch
import transformers

from v4jax.checkpoint.safetensors import ShardedCheckpoint
from v4jax.checkpoint.synthetic import dequantize_fp4, dequantize_fp8_blocks

__all__ = ["clear_cache", "hf_capture", "hf_logits", "hf_model", "hf_tensor", "hf_name"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_CACHE: dict[tuple[str, str], torch.nn.Module] = {}

# Release leaf path (after `layers.i.`) -> HF path (after `model.layers.i.`), tried in order.
_RENAMES: list[tuple[str, str]] = [
    (r"^attn\.indexer\.compressor\.", "self_attn.compressor.indexer."),
    (r"^attn\.indexer\.wq_b\.", "self_attn.compressor.indexer.q_b_proj."),
    (r"^attn\.indexer\.weights_proj\.", "self_attn.compressor.indexer.scorer.weights_proj."),
    (r"^attn\.", "self_attn."),
    (r"^attn_norm\.", "input_layernorm."),
    (r"^ffn_norm\.", "post_attention_layernorm."),
    (r"^hc_(attn|ffn)_(fn|base|scale)$", r"\1_hc.\2"),
    (r"^ffn\.gate\.bias$", "mlp.gate.e_score_correction_bias"),
    (r"^ffn\.shared_experts\.w1\.", "mlp.shared_experts.gate_proj."),
    (r"^ffn\.shared_experts\.w2\.", "mlp.shared_experts.down_proj."),
    (r"^ffn\.shared_experts\.w3\.", "mlp.shared_experts.up_proj."),
    (r"^ffn\.", "mlp."),
]
_LEAVES = {
    "wq_a": "q_a_proj",
    "q_norm": "q_a_norm",
    "wq_b": "q_b_proj",
    "wkv": "kv_proj",
    "wgate": "gate_proj",
    "wo_a": "o_a_proj",
    "wo_b": "o_b_proj",
    "attn_sink": "sinks",
    "ape": "position_bias",
    "norm": "kv_norm",
}
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def hf_name(release_name: str) -> str | None:
    """HF parameter/buffer name of a release tensor; None for `mtp.*` (HF has no MTP block)
    and for `.scale` tensors (dequantised into their weights while loading).

    Routed experts map to the fused `mlp.experts.gate_up_proj` [E, 2I, d] (rows [:I] = w1,
    [I:] = w3) / `mlp.experts.down_proj` [E, d, I]; use `hf_tensor` to get the slice.
    """
    if release_name in _TOP:
        return _TOP[release_name]
    if release_name.endswith(".scale"):
        return None
    m = re.match(r"^layers\.(\d+)\.(.+)$", release_name)
    if m is None:
        return None
    rest = m.group(2)
    if e := re.match(r"^ffn\.experts\.\d+\.(w[123])\.weight$", rest):
        leaf = "down_proj" if e.group(1) == "w2" else "gate_up_proj"
        return f"model.layers.{m.group(1)}.mlp.experts.{leaf}"
    for pat, rep in _RENAMES:
        rest, n = re.subn(pat, rep, rest)
        if n:
            break
    parts = rest.split(".")
    parts = [_LEAVES.get(p, p) if i >= 1 else p for i, p in enumerate(parts)]
    return f"model.layers.{m.group(1)}." + ".".join(parts)


def hf_tensor(model: torch.nn.Module, release_name: str) -> torch.Tensor | None:
    """The HF model's tensor holding release tensor `release_name` (expert slices included)."""
    name = hf_name(release_name)
    if name is None:
        return None
    try:
        t = model.get_parameter(name)
    except AttributeError:
        t = model.get_buffer(name)
    if e := re.search(r"\.experts\.(\d+)\.(w[123])\.", release_name):
        idx, w = int(e.group(1)), e.group(2)
        inter = model.config.moe_intermediate_size
        t = t[idx] if w == "w2" else t[idx, :inter] if w == "w1" else t[idx, inter:]
    return t


def _check_weights(model: torch.nn.Module, folder: Path) -> None:
    """Every non-MTP tensor of `folder` equals the HF tensor it became (exact, after dequant)."""
    ck = ShardedCheckpoint(folder)
    bad = []
    for name in ck.keys():
        if name.endswith(".scale") or name.startswith("mtp."):
            continue
        t = hf_tensor(model, name)
        x = ck.get(name)
        if ck.info(name).dtype == "F8_E4M3":
            x = dequantize_fp8_blocks(x, ck.get(name.removesuffix("weight") + "scale"))
        elif ck.info(name).dtype == "I8":
            x = dequantize_fp4(x, ck.get(name.removesuffix("weight") + "scale"))
        ref = np.asarray(x).astype(np.int64 if x.dtype == np.int64 else np.float32)
        got = t.detach().cpu()
        got = got.numpy() if ref.dtype == np.int64 else got.float().numpy()
        if got.shape != ref.shape or not np.array_equal(got, ref):
            bad.append(name)
    ck.close()
    if bad:
        raise AssertionError(
            f"{folder}: HF weights differ from the checkpoint for {bad[:5]} ({len(bad)} tensors)"
        )


def hf_model(folder: str | Path, dtype: str = "float32") -> torch.nn.Module:
    """`DeepseekV4ForCausalLM` for a release folder, on CPU, eval mode, cached per (folder, dtype).

    dtype "float32": every parameter fp32 (HF then computes everything in fp32 - the best
    structural oracle); "bfloat16": as HF loads it (bf16 weights and activations, mHC / sinks /
    compressor `position_bias` / router bias in fp32). Raises if loading reports missing,
    unexpected or mismatched keys or any weight differs from the checkpoint.
    """
    key = (str(Path(folder).resolve()), dtype)
    if key in _CACHE:
        return _CACHE[key]
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    if dtype == "float32":  # loading dominates (HF unpacks FP4 slowly): reuse the bf16 load
        model = copy.deepcopy(hf_model(folder, "bfloat16")).float()  # exact: bf16 -> fp32
        _check_weights(model, Path(key[0]))
        _CACHE[key] = model
        return model
    qcfg = transformers.FineGrainedFP8Config(dequantize=True)  # never FP8 kernels, even on GPU
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        key[0], quantization_config=qcfg, output_loading_info=True, device_map="cpu"
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise AssertionError(f"{folder}: HF loading reported {problems}")
    if type(model).__name__ != "DeepseekV4ForCausalLM":
        raise AssertionError(f"{folder}: loaded {type(model).__name__}")
    model.eval()
    _check_weights(model, Path(key[0]))
    _CACHE[key] = model
    return model


def hf_logits(folder: str | Path, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """Logits [B, S, V] float32 of one full-sequence forward (positions 0..S-1, no cache)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, S], got shape {tokens.shape}")
    model = hf_model(folder, dtype)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)), use_cache=False)
    return out.logits.float().numpy()


def hf_capture(
    model: torch.nn.Module, tokens: np.ndarray, modules: list[str]
) -> dict[str, tuple[tuple, dict, object]]:
    """Runs a full forward and records (args, kwargs, output) of each named submodule.

    Names as in `model.named_modules()`, e.g. "model.layers.1.self_attn.compressor.indexer",
    "model.layers.0.attn_hc", "model.layers.2.mlp". The last call wins if a module runs twice.
    """
    seen: dict[str, tuple[tuple, dict, object]] = {}
    hooks = []
    for name in modules:

        def hook(
            _mod: torch.nn.Module, args: tuple, kwargs: dict, out: object, name: str = name
        ) -> None:
            seen[name] = (args, kwargs, out)

        hooks.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def clear_cache() -> None:
    """Drops every cached model."""
    _CACHE.clear()
