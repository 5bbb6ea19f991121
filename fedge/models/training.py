"""Local training and evaluation loops shared by the ClientApp and the server."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_loader(
    x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    dataset = TensorDataset(torch.tensor(x), torch.tensor(y))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def proximal_penalty(model: nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx term (mu/2)·||w - w_global||², keeping drift on non-IID data bounded."""
    squared = sum(((param - anchor[name]) ** 2).sum() for name, param in model.named_parameters())
    return 0.5 * mu * squared  # type: ignore[return-value]


@torch.no_grad()
def proximal_step(model: nn.Module, anchor: dict[str, torch.Tensor], rate: float) -> None:
    """w ← w − rate·(w − w_global): the FedProx gradient step, taken on its own."""
    for name, param in model.named_parameters():
        param.sub_(rate * (param - anchor[name]))


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    proximal_mu: float = 0.0,
    step_hook: Callable[[], None] | None = None,
    private: bool = False,
) -> float:
    """Run `epochs` of cross-entropy SGD; returns the mean loss of the last epoch.

    With `private` (an Opacus DP-SGD optimizer) every gradient is replaced by the
    clipped, noised mean of per-sample gradients, which would silently drop the
    FedProx term's gradient. There the term is a decoupled step after each update,
    w ← w − lr·μ·(w − w_global): it reads no data, so it costs no privacy.
    """
    criterion = nn.CrossEntropyLoss()
    anchor = (
        {name: p.detach().clone() for name, p in model.named_parameters()}
        if proximal_mu > 0
        else None
    )
    model.train()
    last_epoch_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for features, labels in loader:
            optimizer.zero_grad()
            loss = criterion(model(features), labels)
            if anchor and not private:
                (loss + proximal_penalty(model, anchor, proximal_mu)).backward()
            else:
                loss.backward()
            optimizer.step()
            if anchor and private:
                proximal_step(model, anchor, optimizer.param_groups[0]["lr"] * proximal_mu)
            if step_hook is not None:
                step_hook()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
        last_epoch_loss = total / max(count, 1)
    return last_epoch_loss


@torch.no_grad()
def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on (x, y)."""
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for features, labels in make_loader(x, y, batch_size, shuffle=False):
        logits = model(features)
        total_loss += float(criterion(logits, labels))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return total_loss / len(y), correct / len(y)
