"""A small CNN sized from its input; GroupNorm so Opacus can train it."""

from __future__ import annotations

import torch
from torch import nn


def _groups(channels: int) -> int:
    return min(8, channels)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; works from 8x8 (digits) to 28x28+ (MNIST).

    `features` and `head` are separate attributes so the edge export can split
    the network into an int8 backbone and a numpy-trainable classifier.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs an input shape (C, H, W), got {input_shape}")
        channels, height, width = input_shape
        pool = 2 if min(height, width) >= 16 else 1
        # A fixed-window average pool down to about 4x4: unlike AdaptiveAvgPool2d it
        # exports to ONNX for any size (28x28 included), not only multiples of 4.
        window = (max(1, height // pool // 4), max(1, width // pool // 4))
        pooled = (height // pool // window[0], width // pool // window[1])
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.GroupNorm(_groups(16), 16),
            nn.ReLU(),
            nn.MaxPool2d(pool),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.GroupNorm(_groups(32), 32),
            nn.ReLU(),
            nn.AvgPool2d(window),
            nn.Flatten(),
            nn.Linear(32 * pooled[0] * pooled[1], 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
