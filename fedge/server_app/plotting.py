"""metrics.png: how accuracy and loss moved, round by round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (left) and losses (right) per round; ε joins the left panel when present."""
    if not rows:
        return
    rounds = [row["round"] for row in rows]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot(rounds, [row["test_accuracy"] for row in rows], marker="o", label="held-out test")
    if all("val_accuracy" in row for row in rows):
        acc_ax.plot(rounds, [row["val_accuracy"] for row in rows], marker=".", label="client val")
    acc_ax.set(xlabel="round", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    acc_ax.grid(alpha=0.3)
    if any(row.get("epsilon") is not None for row in rows):
        eps_ax = acc_ax.twinx()
        eps_ax.plot(
            rounds, [row.get("epsilon") for row in rows], color="tab:red", ls="--", label="ε"
        )
        eps_ax.set_ylabel("ε (privacy spent)", color="tab:red")
        eps_ax.legend(loc="center right")
    acc_ax.legend(loc="lower right")
    loss_ax.plot(rounds, [row["test_loss"] for row in rows], marker="o", label="held-out test")
    if any(row.get("train_loss") is not None for row in rows):
        loss_ax.plot(
            rounds, [row.get("train_loss") for row in rows], marker=".", label="client train"
        )
    loss_ax.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    for axis in (acc_ax, loss_ax):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
