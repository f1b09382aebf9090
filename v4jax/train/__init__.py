"""Training and fine-tuning DeepSeek-V4 (README, "Layout": a consumer of the public API).

    from v4jax import train
    tm = train.trainable(model)                             # float32 masters (qat=True: QAT)
    loss, metrics, grads = train.value_and_grad(tm, tokens, mask)
    train.release_named(grads)                              # {official tensor name: gradient}

Modules: `model` (trainable form, QAT, back to the release formats), `losses` (LM, MTP,
balance, indexer KL, `value_and_grad`, router-bias update), `optim` (Muon + AdamW),
`schedule` (learning rate, MTP weight), `data` / `packing` / `sources` (grain pipelines),
`step` (train state, jitted step with accumulation), `loop` (a run: metrics, checkpoints,
held-out loss, plot), `checkpoint` (Orbax manager), `lora` (adapters), `plot`.
"""

from v4jax.train.data import DataConfig, build_datasets
from v4jax.train.loop import Diverged, RunConfig
from v4jax.train.loop import train as run
from v4jax.train.losses import loss, update_router_bias, value_and_grad
from v4jax.train.model import TrainModel, release_named, to_model, trainable
from v4jax.train.optim import OptimConfig, make_optimizer, partition
from v4jax.train.schedule import LRSchedule
from v4jax.train.step import LossWeights, TrainState, init_state, make_step

__all__ = [
    "DataConfig",
    "Diverged",
    "LRSchedule",
    "LossWeights",
    "OptimConfig",
    "RunConfig",
    "TrainModel",
    "TrainState",
    "build_datasets",
    "init_state",
    "loss",
    "make_optimizer",
    "make_step",
    "partition",
    "release_named",
    "run",
    "to_model",
    "trainable",
    "update_router_bias",
    "value_and_grad",
]
