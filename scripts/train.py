"""Train or fine-tune a DeepSeek-V4 model (v4jax.train): metrics.jsonl, checkpoints, loss PNG.

    .venv/bin/python scripts/train.py --preset small --data "$(python3 -c 'import sysconfig;
        print(sysconfig.get_paths()["stdlib"])')" --out runs/demo --steps 200
    .venv/bin/python scripts/train.py --from DeepSeek-V4-Flash/ --data chat.jsonl --out runs/sft \
        --lora 16 --steps 200
    .venv/bin/python scripts/train.py ... --resume            # continue the run in --out
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

PRESETS = ("tiny", "small", "flash", "pro")


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"random init of a preset: {', '.join(PRESETS)}")
    src.add_argument("--from", dest="source", help="release folder or v4jax Orbax checkpoint")
    ap.add_argument("--data", nargs="+", required=True, help="text / JSONL files, dirs or globs")
    ap.add_argument("--out", required=True, help="run directory")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="peak LR (muon 2.7e-4 x 10 small)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--optimizer", default="muon", choices=["muon", "adamw"])
    ap.add_argument("--qat", action="store_true", help="FP4/FP8 quantisation-aware training")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end this invocation after this step (checkpointed; --resume goes on)",
    )
    ap.add_argument("--export", default=None, help="write the release format here at the end")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--lora-targets", default=None, help="comma-separated projection names")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mtp-weight", type=float, default=None, help="default: 0.3 then 0.1")
    ap.add_argument("--balance-weight", type=float, default=1e-4)
    ap.add_argument("--indexer-weight", type=float, default=0.0)
    ap.add_argument("--heldout", type=float, default=0.02, help="held-out fraction of documents")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. 'data=2 x expert=4' (axes data, fsdp, expert, tensor; TRAIN rules)",
    )
    ap.add_argument(
        "--moe-buffer",
        type=float,
        default=None,
        help="with --mesh: expert-parallel receive buffer = this x a balanced load; "
        "assignments past it are dropped (metric moe_dropped). Default: dropless",
    )
    ap.add_argument(
        "--remat",
        default="none",
        help="rematerialisation: none | block | tensors | save:NAME,... | offload[:NAME,...]",
    )
    return ap.parse_args(argv)


def _check(a) -> None:
    """Everything that can be refused before any model is built or compiled."""
    for name in ("steps", "batch", "accum", "seq_len", "save_every"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if a.preset and a.preset not in PRESETS:
        raise ValueError(f"--preset {a.preset!r}: unknown, expected one of {', '.join(PRESETS)}")
    if a.source and not os.path.isdir(a.source):
        raise ValueError(f"--from {a.source}: no such directory")
    if a.lr is not None and not a.lr > 0:
        raise ValueError("--lr must be > 0")
    from sharding import make_mesh
    from v4jax.model import remat as remat_policy

    remat_policy.check(a.remat)
    if a.mesh is not None:
        try:
            make_mesh(a.mesh)  # the spec and the device count, before any data is read
        except ValueError as e:
            raise ValueError(f"--mesh: {e}") from None
        if a.lora:
            raise ValueError("--mesh with --lora is not supported yet (LoRA trains on one device)")
    if a.moe_buffer is not None:
        if a.mesh is None:
            raise ValueError("--moe-buffer bounds the expert-parallel exchange: it needs --mesh")
        if not a.moe_buffer >= 1:
            raise ValueError(f"--moe-buffer must be >= 1 (a balanced load), not {a.moe_buffer}")
    if a.lora < 0:
        raise ValueError("--lora must be >= 0")
    if a.qat and a.lora:
        raise ValueError("--qat and --lora cannot be combined (LoRA keeps the base frozen)")
    ck = os.path.join(a.out, "checkpoints")
    if os.path.isdir(ck) and os.listdir(ck) and not a.resume:
        raise ValueError(f"--out {a.out} already holds a run: add --resume or pick another --out")
    if a.export and os.path.exists(a.export):
        raise ValueError(f"--export {a.export} exists already")


def main(argv=None) -> int:
    a = _args(argv)
    _check(a)
    import jax
    import jax.numpy as jnp

    import sharding
    import v4jax
    from v4jax.train import data as tdata
    from v4jax.train import loop, lora
    from v4jax.train import model as tmodel
    from v4jax.train.step import LossWeights

    cfg = getattr(v4jax.config, a.preset)() if a.preset else v4jax.config.from_json(a.source)
    dcfg = tdata.DataConfig(
        paths=tuple(a.data),
        seq_len=a.seq_len,
        batch_size=a.batch,
        seed=a.seed,
        held_out_fraction=a.heldout,
    )
    data = tdata.build_datasets(dcfg, vocab_size=cfg.vocab_size)  # checks every file first
    print(data.describe())
    dtype = jnp.float32 if a.dtype == "float32" else jnp.bfloat16
    place = {}
    if a.mesh is not None:
        try:
            place = dict(mesh=sharding.make_mesh(a.mesh), rules=sharding.TRAIN)
        except ValueError as e:
            raise ValueError(f"--mesh: {e}") from None
        print(f"mesh: {dict(place['mesh'].shape)} (TRAIN rules), {jax.device_count()} devices")
    if a.preset:
        base = v4jax.init(cfg, seed=a.seed, numerics="bf16", dtype=dtype, **place)
    else:
        base = v4jax.load(a.source, numerics="bf16", dtype=dtype, **place)
    lm = None
    if a.lora:
        lm = lora.attach(base, a.lora, targets=a.lora_targets or lora.DEFAULT_TARGETS, seed=a.seed)
        tm = lm.train_model()  # params = the adapters; the base stays frozen in release formats
        n = sum(x.size for x in jax.tree.leaves(tm.params))
        print(f"LoRA rank {a.lora} on {', '.join(lm.spec.targets)}: {n / 1e6:.3f}M trainable")
    else:
        tm = tmodel.trainable(base, qat=a.qat).replace(moe_buffer=a.moe_buffer)
    balance = 0.0 if a.lora else a.balance_weight  # LoRA: the routers stay frozen
    print(
        f"model: {v4jax.count_params(cfg)['total'] / 1e6:.1f}M parameters, "
        f"{'QAT (reference numerics)' if a.qat else 'bf16 numerics'}, activations {a.dtype}"
    )
    run = loop.RunConfig(
        out=a.out,
        steps=a.steps,
        lr=a.lr or 2.7e-3,
        warmup=a.warmup or min(100, a.steps // 10),
        optimizer=a.optimizer,
        accum=a.accum,
        seed=a.seed,
        save_every=a.save_every,
        eval_every=a.eval_every,
        stop_after=a.stop_after,
        remat=a.remat,
        weights=LossWeights(
            mtp=a.mtp_weight,
            balance=balance,
            indexer=a.indexer_weight,
            bias_rate=0.0 if a.lora else 1e-3,
        ),
    )
    summary = loop.train(tm, data, run, resume=a.resume)
    before, after = summary.get("heldout_before"), summary.get("heldout_after")
    if before and after:
        print(
            f"held-out CE {before['loss']:.3f} -> {after['loss']:.3f} "
            f"(perplexity {before['ppl']:.1f} -> {after['ppl']:.1f})"
        )
    print(f"metrics: {a.out}/metrics.jsonl, curve: {summary['plot']}")
    trained = summary["model"]
    if lm is not None:
        lm = dataclasses.replace(lm, adapters=trained.params)
        lora.save_adapters(lm, os.path.join(a.out, "adapters.safetensors"))
        print(f"adapters: {a.out}/adapters.safetensors")
    if a.export:
        final = lora.merge(lm) if lm is not None else tmodel.to_model(trained)
        v4jax.export_hf(final, a.export)
        print(f"exported the release format to {a.export}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
