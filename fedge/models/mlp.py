"""An MLP for tabular data (breast-cancer, CSV folders)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TabularMLP(nn.Module):
    """Flattens its input, so it also serves any fixed-shape array data."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        in_features = math.prod(input_shape)
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, 64),
            nn.GroupNorm(8, 64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
