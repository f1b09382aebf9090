"""Test-only reference implementations (oracles) that the JAX port is compared against.

`tests.oracles.hf` wraps Hugging Face transformers' `DeepseekV4ForCausalLM` (needs the `test`
extra: torch, transformers >= 5.23, accelerate). Nothing under `v4jax/` imports this package.
"""
