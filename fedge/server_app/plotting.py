"""metrics.png: how accuracy, loss and (under DP) ε moved, round by round."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    """Write `metrics_figure(rows)` to `path` (nothing when there are no rows)."""
    if not rows:
        return
    fig = metrics_figure(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metrics_figure(rows: list[dict[str, Any]]) -> Figure:
    """Accuracy and losses per round, and a third panel with ε when the run reports it."""
    rounds = [row["round"] for row in rows]
    with_epsilon = any("epsilon" in row for row in rows)
    fig, axes = plt.subplots(1, 3 if with_epsilon else 2, figsize=(15 if with_epsilon else 10, 4))
    acc_ax, loss_ax = axes[0], axes[1]
    acc_ax.plot(rounds, [row["test_accuracy"] for row in rows], marker="o", label="held-out test")
    if all("val_accuracy" in row for row in rows):
        acc_ax.plot(rounds, [row["val_accuracy"] for row in rows], marker=".", label="client val")
    acc_ax.set(ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    loss_ax.plot(rounds, [row["test_loss"] for row in rows], marker="o", label="held-out test")
    if any(row.get("train_loss") is not None for row in rows):
        loss_ax.plot(
            rounds,
            [nan_for_none(row.get("train_loss")) for row in rows],
            marker=".",
            label="client train",
        )
    loss_ax.set(ylabel="cross-entropy", title="Loss")
    if with_epsilon:
        plot_epsilon(axes[2], rounds, rows)
    for axis in axes:
        round_axis(axis, rounds)
        axis.grid(alpha=0.3)
        axis.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_epsilon(axis: Axes, rounds: list[int], rows: list[dict[str, Any]]) -> None:
    """ε after each round, from the first one on; a gap where the guarantee is void."""
    epsilons = [nan_for_none(row.get("epsilon")) for row in rows]
    axis.plot(rounds, epsilons, marker="o", color="tab:red", label="ε spent")
    title = "Privacy spent"
    if any(row.get("epsilon", 0.0) is None for row in rows):
        title += " (ε = ∞ where a round ran without DP)"
    axis.set(ylabel="ε", title=title)
    axis.set_ylim(bottom=0)


def round_axis(axis: Axes, rounds: list[int]) -> None:
    """Whole rounds only, also for a one-round run (matplotlib's default pads 1 to 0.95-1.05)."""
    axis.set_xlabel("round")
    axis.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def nan_for_none(value: float | None) -> float:
    """A gap in the line for a missing value (matplotlib cannot plot None)."""
    return math.nan if value is None else value
