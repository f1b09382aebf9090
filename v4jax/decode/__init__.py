"""The decode loop: V4's heterogeneous cache, chunked prefill, decode steps, sampling and
generation (plain, or MTP speculative: `speculative`, `verify`, `accept`). Separate from the
model: the model computes, this package owns the state."""

from v4jax.decode.cache import CompressorState, DecodeCache, LayerCache, init_cache
from v4jax.decode.chunk import forward_chunk
from v4jax.decode.generate import Generation, generate, generate_stream, pad_prompts
from v4jax.decode.persist import cache_bytes, load_cache, measured_bytes, save_cache
from v4jax.decode.prefix_store import PrefixCache
from v4jax.decode.sampling import Sampling, greedy, sample

__all__ = [
    "CompressorState",
    "DecodeCache",
    "Generation",
    "LayerCache",
    "PrefixCache",
    "Sampling",
    "forward_chunk",
    "cache_bytes",
    "generate",
    "generate_stream",
    "greedy",
    "init_cache",
    "load_cache",
    "measured_bytes",
    "pad_prompts",
    "sample",
    "save_cache",
]
