"""The loss-curve PNG of a run, from its `metrics.jsonl` (matplotlib, no display needed)."""

from __future__ import annotations

import json
import os

__all__ = ["plot_run", "read_metrics"]

_CURVES = (("loss", "total loss"), ("ce", "next-token CE"), ("mtp", "MTP CE"))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Writes `run_dir/loss.png` (or `out`): training losses per step, held-out loss where
    measured, learning rate on a second panel. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    out = os.fspath(out or os.path.join(run_dir, "loss.png"))
    fig, (ax, ax_lr) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    steps = [r["step"] for r in rows]
    for key, label in _CURVES:
        if any(key in r for r in rows):
            ax.plot(
                [r["step"] for r in rows if key in r],
                [r[key] for r in rows if key in r],
                label=label,
                linewidth=1,
            )
    held = [(r["step"], r["heldout_loss"]) for r in rows if "heldout_loss" in r]
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out CE", markersize=3)
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
