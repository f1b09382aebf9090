"""v4jax: DeepSeek-V4 (Flash / Pro) in JAX/Flax.

cfg = v4jax.config.flash()
v4jax.count_params(cfg)
model = v4jax.load(path, numerics="reference")
logits = model.logits(tokens)
"""

from v4jax import config
from v4jax.api import Model, count_params, init, load
from v4jax.checkpoint.errors import CheckpointError
from v4jax.config import ConfigError

__all__ = ["CheckpointError", "ConfigError", "Model", "config", "count_params", "init", "load"]
__version__ = "0.1.0"
