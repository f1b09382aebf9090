"""A training run: data -> jitted steps -> metrics, held-out loss, checkpoints, loss curve.

`train(tm, data, run)` writes into `run.out`:

- `metrics.jsonl`: one JSON object per optimizer step, steps numbered from 1 (`step`, `loss`,
  its parts `ce` / `mtp` / `balance` / `indexer`, `grad_norm`, `lr`, `tokens_per_s`,
  `load_max_over_mean`, `moe_dropped` (routed assignments a `moe_buffer` bound dropped), and
  `heldout_loss` / `heldout_ppl` on evaluation steps);
- `checkpoints/<step>/`: Orbax checkpoints of the whole train state and the data position
  (`checkpoint.py`), every `save_every` steps and at the end;
- `loss.png`: the loss curves; `run.json`: the run's configuration and a summary.

Resuming (`resume=True`) restores the latest checkpoint (state, data position) and continues;
the rows of `metrics.jsonl` past that checkpoint are dropped, so the file again has one row
per step. Runs are deterministic: the same seed gives the same losses bit for bit on one
machine, and a resumed run continues exactly as the uninterrupted one.

A non-finite loss or gradient stops the run with `Diverged` naming the step; that step is not
applied and no checkpoint is written after it, so the last good checkpoint stays intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from v4jax.config import to_dict
from v4jax.model import remat as remat_policy
from v4jax.numerics.policy import jit
from v4jax.train import optim
from v4jax.train.checkpoint import Checkpointer
from v4jax.train.model import TrainModel
from v4jax.train.plot import plot_run
from v4jax.train.schedule import LRSchedule
from v4jax.train.step import LossWeights, TrainState, init_state, make_step

__all__ = ["Diverged", "RunConfig", "heldout_loss", "train"]


class Diverged(RuntimeError):
    """The loss or gradient norm became NaN / Inf; the message names the step."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    out: str
    steps: int
    lr: float = 2.7e-4  # peak learning rate (V4-Flash)
    warmup: int = 0  # linear warm-up steps (V4 at scale: 2000)
    decay_start: int | None = None  # cosine to lr/10 from here to `steps` (None: 80% of steps)
    optimizer: str = "muon"  # "muon" (V4) or "adamw" (everything AdamW)
    accum: int = 1  # micro-batches per step (gradient accumulation)
    weights: LossWeights = LossWeights()
    eval_every: int = 0  # held-out loss every N steps (0: only before and after)
    eval_batches: int = 4  # held-out batches per evaluation
    save_every: int = 100
    keep: int = 3
    seed: int = 0
    stop_after: int | None = None  # end this invocation after this step (checkpointed there)
    remat: str = "none"  # rematerialisation policy (v4jax.model.remat): none|block|tensors|save:..

    def __post_init__(self):
        remat_policy.check(self.remat)
        for name in ("steps", "accum", "save_every", "keep", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r}: expected 'muon' or 'adamw'")

    def schedule(self) -> LRSchedule:
        start = int(0.8 * self.steps) if self.decay_start is None else self.decay_start
        start = min(max(start, self.warmup), self.steps - 1) if self.steps > 1 else 0
        return LRSchedule(
            peak=self.lr, warmup=self.warmup, decay_start=start, total=max(self.steps, start + 1)
        )


def train(
    tm: TrainModel, data, run: RunConfig, *, resume: bool = False, log=print, progress: bool = True
) -> dict:
    """Trains `tm` on `data` (`v4jax.train.data.Datasets`); returns the run summary.
    Returns the final `TrainModel` as `summary["model"]`. The run takes over `tm`'s weight
    buffers (no second copy in memory): use `summary["model"]` afterwards, not `tm`."""
    ckdir = os.path.join(run.out, "checkpoints")
    if not resume and os.path.isdir(ckdir) and os.listdir(ckdir):
        raise FileExistsError(f"{run.out} already holds checkpoints: pass resume=True (--resume)")
    os.makedirs(run.out, exist_ok=True)
    schedule = run.schedule()
    optimizer = optim.make_optimizer(tm.params, schedule=schedule, kind=run.optimizer)
    state = init_state(tm, optimizer, seed=run.seed, copy=False)
    it = iter(data.train)
    meta = {"config": to_dict(tm.config), "qat": tm.qat, "run": _jsonable(run)}
    with Checkpointer(ckdir, keep=run.keep) as ck:
        if resume and ck.latest_step() is not None:
            state, it = _restore(ck, state, it, meta, log)
        _trim_metrics(run.out, int(state.step))
        step_fn = make_step(tm, optimizer, schedule, run.weights, remat=run.remat)
        evaluate = _evaluator(tm, data, run)
        summary = {"heldout_before": evaluate(state)} if int(state.step) == 0 else {}
        state = _loop(step_fn, state, it, ck, run, evaluate, meta, log, progress)
        summary["heldout_after"] = evaluate(state)
        ck.save(int(state.step), state, data=it.get_state(), meta=meta)
        ck.wait()
    summary.update(steps=int(state.step), plot=plot_run(run.out))
    with open(os.path.join(run.out, "run.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "summary": summary}, f, indent=1)
    summary["model"] = tm.replace(params=state.params, frozen=state.frozen)
    return summary


def _loop(
    step_fn,
    state: TrainState,
    it,
    ck: Checkpointer,
    run: RunConfig,
    evaluate,
    meta: dict,
    log,
    progress: bool,
) -> TrainState:
    start = int(state.step)
    bar = tqdm(total=run.steps, initial=start, disable=not progress, desc="train", unit="step")
    with open(os.path.join(run.out, "metrics.jsonl"), "a", encoding="utf-8") as out:
        last = run.steps if run.stop_after is None else min(run.steps, run.stop_after)
        for step in range(start + 1, last + 1):
            tokens, mask = _next_batch(it, run.accum)
            t0 = time.perf_counter()
            state, m = step_fn(state, tokens, mask)
            m = {k: np.asarray(v).item() for k, v in jax.device_get(m).items()}
            if not m.pop("finite"):
                ck.wait()
                raise Diverged(f"step {step}: loss {m['loss']}, grad norm {m['grad_norm']}")
            m.update(step=step, tokens_per_s=tokens.size / (time.perf_counter() - t0))
            if run.eval_every and step % run.eval_every == 0 and step < run.steps:
                m.update(_heldout_row(evaluate(state)))
            out.write(json.dumps(m) + "\n")
            out.flush()
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
            bar.update(1)
            if step % run.save_every == 0 and step < run.steps:
                ck.save(step, state, data=it.get_state(), meta=meta)
    bar.close()
    return state


def _next_batch(it, accum: int) -> tuple[np.ndarray, np.ndarray]:
    batches = [next(it) for _ in range(accum)]
    tokens = np.stack([b.tokens for b in batches])  # [A, B, S]
    return tokens, np.stack([b.mask for b in batches])


def _restore(ck: Checkpointer, state, it, meta: dict, log):
    step = ck.latest_step()
    saved = ck.read_meta(step)
    if saved.get("config") != meta["config"]:
        raise ValueError(f"{ck.directory}: checkpoint {step} is of another model config")
    state, data_state, _ = ck.restore(step, state)
    it.set_state(data_state)
    log(f"resumed from step {step} ({ck.directory})")
    return state, it


def _trim_metrics(out: str, step: int) -> None:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows)


def _evaluator(tm: TrainModel, data, run: RunConfig) -> Callable[[TrainState], dict | None]:
    if data.held_out is None:
        return lambda state: None
    batches = []
    for b in data.held_out:
        batches.append(b)
        if len(batches) == run.eval_batches:
            break
    return lambda state: heldout_loss(tm.replace(params=state.params, frozen=state.frozen), batches)


def heldout_loss(tm: TrainModel, batches) -> dict:
    """Mean next-token CE (and perplexity) over the target tokens of `batches`."""
    total, count = 0.0, 0
    for b in batches:
        s, n = _ce_sum(tm, tm.place_batch(b.tokens), tm.place_batch(b.mask))
        total, count = total + float(s), count + int(n)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}


@jit
def _ce_sum(tm: TrainModel, tokens, mask):
    with tm.rules_context():
        logits = tm.module()(tokens)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = (mask[:, 1:] != 0).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def _heldout_row(h: dict | None) -> dict:
    return {} if h is None else {"heldout_loss": h["loss"], "heldout_ppl": h["ppl"]}


def _jsonable(run: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(run)
    d["weights"] = dataclasses.asdict(run.weights)
    return d
