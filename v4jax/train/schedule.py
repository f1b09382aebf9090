"""The V4 learning-rate schedule: linear warm-up, constant peak, cosine decay to a tenth.

V4 report §4.2.2: warm-up over 2000 steps to the peak (Flash 2.7e-4,
Pro 2.0e-4), held constant for most of training, then cosine-decayed "near the end" to a tenth of
the peak. The report does not give the step where the cosine starts, so `decay_start` is an
explicit field. The MTP loss weight drops from 0.3 to 0.1 "from the start of LR decay", so
the schedule also answers `in_decay(step)` for the loss code.

`LRSchedule` is a frozen dataclass that is also an optax schedule (`schedule(count) -> lr`): it
is hashable, holds only Python numbers, and its `__call__` is pure jnp so it traces under jit.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

FLASH_PEAK_LR = 2.7e-4  # V4-Flash peak LR (V4 report §4.2.2)
PRO_PEAK_LR = 2.0e-4  # V4-Pro peak LR (V4 report §4.2.2)
WARMUP_STEPS = 2000  # linear warm-up length, both models (V4 report §4.2.2)
FINAL_RATIO = 0.1  # cosine ends at a tenth of the peak: 2.7e-5 / 2.0e-5 (V4 report §4.2.2)
MTP_WEIGHT = 0.3  # MTP loss weight before LR decay (V4 report §4.2.2)
MTP_WEIGHT_DECAY_PHASE = 0.1  # MTP loss weight from the start of LR decay (V4 report §4.2.2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """Learning rate per optimizer step (0-based count, as optax passes it).

    - `peak`: the constant learning rate after warm-up.
    - `warmup`: number of warm-up steps; step s < warmup gets peak * (s + 1) / warmup, so the
      first update is not wasted at lr 0 and step `warmup - 1` reaches the peak.
    - `decay_start`: first step of the cosine; the LR is exactly `peak` there.
    - `total`: step at which the cosine reaches `peak * final_ratio`; held there afterwards.
    - `final_ratio`: end LR as a fraction of the peak.
    """

    peak: float
    warmup: int = WARMUP_STEPS
    decay_start: int
    total: int
    final_ratio: float = FINAL_RATIO

    def __post_init__(self):
        if not (self.peak > 0 and math.isfinite(self.peak)):
            raise ValueError(f"LRSchedule: peak must be a positive finite number, got {self.peak}")
        if not 0 <= self.warmup <= self.decay_start < self.total:
            raise ValueError(
                "LRSchedule: need 0 <= warmup <= decay_start < total, got "
                f"warmup={self.warmup}, decay_start={self.decay_start}, total={self.total}"
            )
        if not 0 <= self.final_ratio <= 1:
            raise ValueError(f"LRSchedule: final_ratio must be in [0, 1], got {self.final_ratio}")

    @property
    def final(self) -> float:
        """The LR at and after `total`."""
        return self.peak * self.final_ratio

    def __call__(self, step) -> jnp.ndarray:
        """step (int or int array, traced or not) -> learning rate, float32."""
        s = jnp.asarray(step, jnp.float32)
        warm = self.peak * (s + 1) / max(self.warmup, 1)
        frac = jnp.clip((s - self.decay_start) / (self.total - self.decay_start), 0.0, 1.0)
        cos = self.final + (self.peak - self.final) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        lr = jnp.where(s < self.warmup, warm, jnp.where(s < self.decay_start, self.peak, cos))
        return lr.astype(jnp.float32)

    def in_decay(self, step) -> jnp.ndarray:
        """Whether `step` is in the LR-decay phase (step >= decay_start); bool, jit-friendly."""
        return jnp.asarray(step) >= self.decay_start

    def mtp_weight(
        self, step, *, before: float = MTP_WEIGHT, after: float = MTP_WEIGHT_DECAY_PHASE
    ) -> jnp.ndarray:
        """MTP loss weight at `step`: `before` (0.3), then `after` (0.1) once the LR decays."""
        return jnp.where(self.in_decay(step), after, before).astype(jnp.float32)


def flash_schedule(*, decay_start: int, total: int, **changes) -> LRSchedule:
    """V4-Flash: warm-up 2000 steps to 2.7e-4, cosine from `decay_start` to 2.7e-5 at `total`."""
    fields = {"peak": FLASH_PEAK_LR, "decay_start": decay_start, "total": total}
    return LRSchedule(**{**fields, **changes})


def pro_schedule(*, decay_start: int, total: int, **changes) -> LRSchedule:
    """V4-Pro: warm-up 2000 steps to 2.0e-4, cosine from `decay_start` to 2.0e-5 at `total`."""
    fields = {"peak": PRO_PEAK_LR, "decay_start": decay_start, "total": total}
    return LRSchedule(**{**fields, **changes})
