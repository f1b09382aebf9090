"""Arguments of the lm-evaluation-harness backend (`v4jax.eval.harness`): model_args parsing,
model loading, and the batching plan of generation. Free of lm-eval's model classes; the
package core never imports it.

model_args arrive as `key=value` pairs joined by commas (lm-eval's format). A mesh spec may
hold commas of its own (`mesh=data:2,tensor:4`): `parse_model_args` keeps the `axis:size`
pieces after `mesh=` with it. On the `lm_eval` command line, whose parser splits at commas
first, write `mesh=data:2xtensor:4` or quote the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

import sharding
import v4jax

__all__ = [
    "batch_size_arg",
    "generation_batches",
    "load_model",
    "parse_buckets",
    "parse_mesh",
    "parse_model_args",
]

_DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32}
_AXIS = re.compile(r"^\s*[a-z]+\s*:\s*\d+\s*$")  # a mesh piece: data:2


def parse_model_args(text: str) -> dict:
    """'pretrained=P,mesh=data:2,tensor:4,batch_size=8' -> {'pretrained': 'P', 'mesh':
    'data:2,tensor:4', 'batch_size': 8} (values typed as lm-eval types them)."""
    from lm_eval.utils import handle_arg_string

    out: dict[str, str] = {}
    key = None
    for item in (p for p in text.split(",") if p.strip()):
        if key == "mesh" and _AXIS.match(item):
            out[key] += "," + item.strip()
            continue
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"model_args {text!r}: {item!r} is not key=value")
        key = name.strip()
        out[key] = value
    return {k: handle_arg_string(v) for k, v in out.items()}


def parse_mesh(spec) -> dict[str, int]:
    """'data:2xtensor:4', 'data:2,tensor:4', 'data=2 x tensor=4' or a dict -> axis sizes."""
    if isinstance(spec, Mapping):
        return sharding.parse_mesh_spec(spec)
    text = re.sub(r"(?<=\d)\s*x\s*", " ", str(spec).replace(":", "="))
    return sharding.parse_mesh_spec(text)


def parse_buckets(spec) -> tuple[int, ...] | None:
    """'64:256:1024' (any non-digit separators), an int or a list of ints -> lengths."""
    if spec is None:
        return None
    if isinstance(spec, int | float):
        return (int(spec),)
    if isinstance(spec, list | tuple):
        return tuple(int(b) for b in spec)
    found = re.findall(r"\d+", str(spec))
    if not found or re.sub(r"[\d\s:x*/,]", "", str(spec)):
        raise ValueError(f"buckets={spec!r}: expected lengths such as 64:256:1024")
    return tuple(int(b) for b in found)


def generation_batches(lengths, buckets, batch_size: int) -> list[tuple[list[int], int]]:
    """[(request indices, padded prompt width)]: longest prompts first; each batch is padded to
    the smallest bucket holding its longest prompt by a filler row when it is shorter (the
    batch then takes batch_size - 1 prompts), so prefill compiles once per bucket."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, pos = [], 0
    while pos < len(order):
        first = lengths[order[pos]]
        width = next(b for b in buckets if b >= first)
        take = batch_size if first == width or batch_size == 1 else batch_size - 1
        out.append((order[pos : pos + take], width if batch_size > 1 else first))
        pos += take
    return out


def batch_size_arg(value) -> int:
    if value is None:
        return 8
    if isinstance(value, str) and not value.isdigit():
        raise ValueError(f"batch_size={value!r}: give a number (batches have a fixed size here)")
    if int(value) < 1:
        raise ValueError(f"batch_size={value}: must be >= 1")
    return int(value)


def load_model(pretrained, numerics, dtype, mesh):
    """A `v4jax.Model`: loaded from a path (release or Orbax), or `pretrained` itself."""
    if isinstance(pretrained, v4jax.Model):
        given = {"numerics": numerics, "dtype": dtype, "mesh": mesh}
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise ValueError(f"pretrained is a loaded model: {extra} cannot be applied to it")
        return pretrained
    if not pretrained:
        raise ValueError("pretrained=PATH is required (a release folder or Orbax checkpoint)")
    if dtype is not None and str(dtype) not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    return v4jax.load(
        str(pretrained),
        numerics=numerics or "reference",
        dtype=None if dtype is None else _DTYPES[str(dtype)],
        mesh=None if mesh is None else sharding.make_mesh(parse_mesh(mesh)),
        progress=False,
    )
