"""v4jax: DeepSeek-V4 (Flash / Pro) in JAX/Flax.

cfg = v4jax.config.flash()
v4jax.count_params(cfg)
model = v4jax.load(path, numerics="reference")
logits = model.logits(tokens)
"""

from v4jax import config
from v4jax.api import Model, count_params, export_hf, init, load
from v4jax.checkpoint.errors import CheckpointError
from v4jax.config import ConfigError
from v4jax.decode import PrefixCache, Sampling, generate, generate_stream

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Model",
    "PrefixCache",
    "Sampling",
    "config",
    "count_params",
    "export_hf",
    "generate",
    "generate_stream",
    "init",
    "load",
]
__version__ = "0.1.0"
