"""fedge's per-sample gradients and clipping match per-example autograd and Opacus."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn

from fedge.models import ModelSpec, build_model
from fedge.privacy._per_sample import FedgeDPOptimizer, FedgeGradSampleHooks

BATCH = 6


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-12))


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Each parameter's gradient for each example alone (batch of 1), stacked."""
    per_example = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        per_example.append([p.grad.detach().clone() for p in _trainable(model)])
    return [torch.stack(grads) for grads in zip(*per_example, strict=True)]


def _hooked_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hooks_class: type) -> list:
    hooks = hooks_class(model, batch_first=True, loss_reduction="mean")
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        return [p.grad_sample.detach().clone() for p in _trainable(model)]
    finally:
        hooks.cleanup()


def _check_against_autograd(model: nn.Module, x: torch.Tensor) -> None:
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(1))
    expected = _per_example_grads(model, x, y)
    actual = _hooked_grads(model, x, y, FedgeGradSampleHooks)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        assert _relative_error(got, want) < 1e-5


@pytest.mark.parametrize(
    ("name", "shape"),
    [("cnn", (1, 8, 8)), ("cnn", (1, 28, 28)), ("cnn", (3, 16, 16)), ("mlp", (30,))],
)
def test_fedge_models_match_per_example_autograd(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name, shape, 3))
    _check_against_autograd(model, torch.randn(BATCH, *shape))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2)),
        nn.Conv2d(4, 6, 3, groups=2),
    ],
)
def test_conv_samplers_match_per_example_autograd(conv: nn.Conv2d) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(BATCH, conv.in_channels, 9, 9)
    model(x)  # materialize the lazy layer
    _check_against_autograd(model, x)


def test_frozen_parameters_and_inplace_activations() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.ReLU(inplace=True),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )
    model[2].bias.requires_grad_(False)
    model[4].weight.requires_grad_(False)
    _check_against_autograd(model, torch.randn(BATCH, 2, 8, 8))


class _Tied(nn.Module):
    """One Linear used twice per forward pass: Opacus's accumulation path."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_reused_layers_fall_back_to_opacus() -> None:
    torch.manual_seed(0)
    model = _Tied()
    x = torch.randn(BATCH, 5)
    y = torch.randint(0, 3, (BATCH,))
    expected = _hooked_grads(model, x, y, GradSampleHooks)
    actual = _hooked_grads(model, x, y, FedgeGradSampleHooks)
    for got, want in zip(actual, expected, strict=True):
        assert _relative_error(got, want) < 1e-5


def _optimizer_grads(optimizer_class: type, noise_multiplier: float, seed: int) -> list:
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", (1, 8, 8), 10))
    hooks = FedgeGradSampleHooks(model, batch_first=True, loss_reduction="mean")
    optimizer = optimizer_class(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=noise_multiplier,
        max_grad_norm=0.5,
        expected_batch_size=8,
        generator=torch.Generator().manual_seed(seed),
    )
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (7,), generator=torch.Generator().manual_seed(3))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.pre_step()
    hooks.cleanup()
    return [p.grad.clone() for p in model.parameters()]


def test_clipping_and_scaling_match_opacus() -> None:
    expected = _optimizer_grads(DPOptimizer, 0.0, 0)
    actual = _optimizer_grads(FedgeDPOptimizer, 0.0, 0)
    for got, want in zip(actual, expected, strict=True):
        assert _relative_error(got, want) < 1e-5


def test_noise_has_opacus_std() -> None:
    clipped = torch.cat([g.flatten() for g in _optimizer_grads(FedgeDPOptimizer, 0.0, 0)])
    noised = torch.cat([g.flatten() for g in _optimizer_grads(FedgeDPOptimizer, 2.0, 5)])
    noise = (noised - clipped) * 8  # undo the division by the expected batch size
    assert noise.numel() > 30_000
    assert abs(float(noise.mean())) < 0.05
    assert float(noise.std()) == pytest.approx(2.0 * 0.5, rel=0.02)


def test_fedge_layers_skip_full_backward_hooks() -> None:
    model = build_model(ModelSpec("cnn", (1, 8, 8), 10))
    hooks = FedgeGradSampleHooks(model, batch_first=True, loss_reduction="mean")
    assert not any(module._backward_hooks for module in model.modules())
    hooks.cleanup()
    assert not any(module._forward_hooks for module in model.modules())


@pytest.mark.parametrize(("name", "shape"), [("cnn", (1, 8, 8)), ("mlp", (30,))])
def test_empty_poisson_batch_gives_zero_gradient(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelSpec(name, shape, 10))
    hooks = FedgeGradSampleHooks(model, batch_first=True, loss_reduction="mean")
    optimizer = FedgeDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=8,
    )
    x, y = torch.zeros(0, *shape), torch.zeros(0, dtype=torch.long)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.pre_step()
    hooks.cleanup()
    for p in model.parameters():
        assert p.grad.shape == p.shape
        assert not p.grad.any()
