"""fedge's per-sample gradients and clipping match per-example autograd and Opacus."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedge.models import ModelSpec, build_model
from fedge.privacy._per_sample import (
    FACTORS,
    FedgeDPOptimizer,
    FedgeGradSampleHooks,
    FedgePrivacyEngine,
    _outer,
)

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


def _hooked_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    hooks_class: type,
    for_fedge_optimizer: bool = False,
) -> list:
    hooks = hooks_class(model, batch_first=True, loss_reduction="mean")
    hooks.for_fedge_optimizer = for_fedge_optimizer
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        return [
            (p.grad_sample if p.grad_sample is not None else _outer(getattr(p, FACTORS))).clone()
            for p in _trainable(model)
        ]
    finally:
        hooks.cleanup()


def _check_against_autograd(model: nn.Module, x: torch.Tensor) -> None:
    """Both with and without the batch gradients that `for_fedge_optimizer` skips."""
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(1))
    expected = _per_example_grads(model, x, y)
    for skip in (False, True):
        actual = _hooked_grads(model, x, y, FedgeGradSampleHooks, for_fedge_optimizer=skip)
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


MODELS = [("cnn", (1, 8, 8)), ("mlp", (30,))]


def _setup(
    name: str, shape: tuple[int, ...], *, stock: bool, max_grad_norm: float = 1.0
) -> tuple[nn.Module, GradSampleHooks, DPOptimizer]:
    """Stock Opacus hooks and optimizer, or fedge's with factored Linear weights."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(name, shape, 10))
    hooks_class, optimizer_class = (
        (GradSampleHooks, DPOptimizer) if stock else (FedgeGradSampleHooks, FedgeDPOptimizer)
    )
    hooks = hooks_class(model, batch_first=True, loss_reduction="mean")
    hooks.for_fedge_optimizer = not stock
    optimizer = optimizer_class(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=20,
    )
    return model, hooks, optimizer


def _backward(model: nn.Module, shape: tuple[int, ...], size: int = 16, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *shape, generator=generator)
    y = torch.randint(0, 10, (size,), generator=generator)
    nn.functional.cross_entropy(model(x), y).backward()


def _linear_weights(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        assert _relative_error(got, want) < 1e-5


@pytest.mark.parametrize(("name", "shape"), MODELS)
@pytest.mark.parametrize("clipped", ["all", "some", "none"])
def test_factored_clipping_matches_opacus(name: str, shape: tuple[int, ...], clipped: str) -> None:
    model, hooks, optimizer = _setup(name, shape, stock=True)
    _backward(model, shape)
    samples = optimizer.grad_samples
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
    max_grad_norm = {
        "all": float(norms.min()) / 2,
        "some": float(norms.median()),
        "none": float(norms.max()) * 2,
    }[clipped]
    optimizer.max_grad_norm = max_grad_norm
    optimizer.pre_step()
    expected = [p.grad.clone() for p in model.parameters()]
    hooks.cleanup()

    model, hooks, optimizer = _setup(name, shape, stock=False, max_grad_norm=max_grad_norm)
    _backward(model, shape)
    weights = _linear_weights(model)
    assert all(p.grad_sample is None and hasattr(p, FACTORS) for p in weights)
    _assert_close(optimizer.grad_samples, samples)  # materialized for Opacus-generic readers
    optimizer.pre_step()
    _assert_close([p.grad for p in model.parameters()], expected)
    hooks.cleanup()
    assert not any(hasattr(p, FACTORS) for p in model.parameters())


@pytest.mark.parametrize(("name", "shape"), MODELS)
def test_accumulated_passes_materialize_factors_like_opacus(
    name: str, shape: tuple[int, ...]
) -> None:
    results = []
    for stock in (True, False):
        model, hooks, optimizer = _setup(name, shape, stock=stock, max_grad_norm=0.1)
        _backward(model, shape, size=5, seed=2)
        _backward(model, shape, size=7, seed=3)
        assert optimizer.accumulated_iterations == 2
        optimizer.pre_step()
        results.append([p.grad.clone() for p in model.parameters()])
        hooks.cleanup()
    _assert_close(results[1], results[0])

    model, hooks, optimizer = _setup(name, shape, stock=False)
    hooks.forbid_grad_accumulation()  # as with Poisson sampling
    _backward(model, shape)
    with pytest.raises(ValueError, match="Poisson sampling"):
        _backward(model, shape)


@pytest.mark.parametrize(("name", "shape"), MODELS)
def test_factors_need_zero_grad_and_do_not_reach_the_next_batch(
    name: str, shape: tuple[int, ...]
) -> None:
    model, hooks, optimizer = _setup(name, shape, stock=False)
    _backward(model, shape)
    optimizer.step()
    with pytest.raises(ValueError, match="zero_grad"):
        optimizer.step()
    optimizer.zero_grad()
    assert not any(hasattr(p, FACTORS) for p in model.parameters())
    _backward(model, shape, size=0)  # an empty Poisson batch
    optimizer.pre_step()
    for p in model.parameters():
        assert p.grad.shape == p.shape
        assert not p.grad.any()
    hooks.cleanup()


@pytest.mark.parametrize(("clipping", "factored"), [("flat", True), ("per_layer", False)])
def test_engine_factors_only_for_fedge_optimizer(clipping: str, factored: bool) -> None:
    model = build_model(ModelSpec("mlp", (30,), 10))
    data = TensorDataset(torch.randn(64, 30), torch.randint(0, 10, (64,)))
    hooks, optimizer, _ = FedgePrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0 if clipping == "flat" else [1.0] * len(list(model.parameters())),
        clipping=clipping,
        wrap_model=False,
    )
    assert isinstance(hooks, FedgeGradSampleHooks)
    assert isinstance(optimizer, FedgeDPOptimizer) == factored
    _backward(model, (30,))
    assert all(hasattr(p, FACTORS) == factored for p in _linear_weights(model))
    optimizer.step()
    hooks.cleanup()


class _Mixed(nn.Module):
    """A Linear on 3-D input, one used twice, and one that can be factored."""

    def __init__(self) -> None:
        super().__init__()
        self.sequence = nn.Linear(4, 5)
        self.tied = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.sequence(x)).mean(1)
        return self.out(torch.tanh(self.tied(torch.tanh(self.tied(hidden)))))


def test_only_single_use_linears_on_2d_input_are_factored() -> None:
    x = torch.randn(BATCH, 3, 4, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (BATCH,), generator=torch.Generator().manual_seed(3))
    results = []
    for stock in (True, False):
        torch.manual_seed(0)
        model = _Mixed()
        hooks = (GradSampleHooks if stock else FedgeGradSampleHooks)(model)
        hooks.for_fedge_optimizer = not stock
        optimizer = (DPOptimizer if stock else FedgeDPOptimizer)(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=0.0,
            max_grad_norm=0.05,
            expected_batch_size=BATCH,
        )
        nn.functional.cross_entropy(model(x), y).backward()
        if not stock:
            factored = [hasattr(m.weight, FACTORS) for m in (model.sequence, model.tied, model.out)]
            assert factored == [False, False, True]
        optimizer.pre_step()
        results.append([p.grad.clone() for p in model.parameters()])
        hooks.cleanup()
    _assert_close(results[1], results[0])


class _InPlaceInput(nn.Module):
    """Scales its input in place first, as some preprocessing layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mul_(2.0))


class _Scaled(nn.Module):
    """A parameter outside fedge's layer types."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def _skip_hooks(model: nn.Module) -> FedgeGradSampleHooks:
    hooks = FedgeGradSampleHooks(model, batch_first=True, loss_reduction="mean")
    hooks.for_fedge_optimizer = True
    return hooks


def test_batch_gradients_are_skipped_and_the_marks_undone() -> None:
    model = build_model(ModelSpec("cnn", (1, 8, 8), 10))
    hooks = _skip_hooks(model)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    loss = nn.functional.cross_entropy(model(x), y)
    assert all(p.requires_grad for p in model.parameters())  # restored after forward
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad_sample is not None or hasattr(p, FACTORS) for p in model.parameters())
    assert not x.requires_grad and x.grad is None  # the caller's tensor is untouched

    def failing_forward(module: nn.Module, args: tuple) -> None:
        raise RuntimeError("boom")

    handle = model.head.register_forward_pre_hook(failing_forward)
    with pytest.raises(RuntimeError, match="boom"):
        model(x)
    handle.remove()
    assert all(p.requires_grad for p in model.parameters())  # restored after a raise
    model.eval()  # no hooks in eval: the model computes batch gradients as usual
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    hooks.cleanup()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_batch_gradients_kept_for_other_parameters_and_tracked_inputs() -> None:
    model = _Scaled()
    hooks = _skip_hooks(model)
    x, y = torch.randn(5, 4, requires_grad=True), torch.randint(0, 3, (5,))
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())  # no skipping at all
    assert x.grad is not None
    hooks.cleanup()

    torch.manual_seed(0)
    model = _InPlaceInput()
    x = torch.randn(BATCH, 4)
    y = torch.randint(0, 3, (BATCH,))
    expected = _per_example_grads(model, x.clone(), y)
    actual = _hooked_grads(model, x, y, FedgeGradSampleHooks, for_fedge_optimizer=True)
    _assert_close(actual, expected)  # in-place ops on the model's input still work
