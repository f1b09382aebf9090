"""Kernels: one public op each, a pure-jnp reference (the specification) and Pallas backends."""
