"""The map between release tensor names and our parameter tree (the release's safetensors index).

A release tensor is a slice of one leaf of our state: `layers.{L}.*` lands at index `r` of the
stacked leaf of its segment (`segments.{s}.blocks.{j}.*`), routed experts
`ffn.experts.{e}.w{1,2,3}.{weight,scale}` at index `e` of `ffn.experts.w{i}` /
`ffn.experts.w{i}_scale`, and `mtp.0.*` under `mtp` (block parts under `mtp.block`).
"""

from __future__ import annotations

import re

from v4jax.config import ModelConfig, layer_plan

Path = tuple[str | int, ...]

_TOP = {
    "embed.weight": ("embed",),
    "head.weight": ("head", "weight"),
    "norm.weight": ("norm", "weight"),
    "hc_head_fn": ("hc_head", "fn"),
    "hc_head_base": ("hc_head", "base"),
    "hc_head_scale": ("hc_head", "scale"),
}
_MTP_OWN = {"e_proj", "h_proj", "enorm", "hnorm", "norm"}
_EXPERT = re.compile(r"ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")
_HC = re.compile(r"hc_(attn|ffn)_(fn|base|scale)$")


def layer_slots(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """Layer L -> (segment s, repetition r, block j within the unit)."""
    slots = []
    for s, seg in enumerate(layer_plan(cfg)):
        for r in range(seg.repeats):
            slots.extend((s, r, j) for j in range(len(seg.kinds)))
    return slots


def _block_path(rest: str) -> tuple[Path, tuple[int, ...]]:
    if m := _EXPERT.fullmatch(rest):
        e, w, kind = m.groups()
        return ("ffn", "experts", w if kind == "weight" else f"{w}_scale"), (int(e),)
    if m := _HC.fullmatch(rest):
        return (f"hc_{m.group(1)}", m.group(2)), ()
    return tuple(rest.split(".")), ()


def locate(name: str, cfg: ModelConfig, slots=None) -> tuple[Path, tuple[int, ...]]:
    """Release name -> (state path, index into the leaf). Raises KeyError for unknown names."""
    if name in _TOP:
        return _TOP[name], ()
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit():
        layer = int(parts[1])
        slots = slots or layer_slots(cfg)
        if layer >= len(slots):
            raise KeyError(name)
        s, r, j = slots[layer]
        path, idx = _block_path(parts[2])
        return ("segments", s, "blocks", j, *path), (r, *idx)
    if parts[0] == "mtp" and len(parts) == 3 and parts[1] == "0" and cfg.num_mtp_layers:
        rest = parts[2]
        head = rest.split(".")[0]
        if head in _MTP_OWN:
            return ("mtp", *rest.split(".")), ()
        if rest.startswith("hc_head_"):
            return ("mtp", "hc_head", rest.removeprefix("hc_head_")), ()
        path, idx = _block_path(rest)
        return ("mtp", "block", *path), idx
    raise KeyError(name)
