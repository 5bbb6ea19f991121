"""Example-level DP-SGD inside a client, with epsilon that accumulates across rounds.

Flower's Opacus example builds a fresh PrivacyEngine every round, so its epsilon
restarts at zero. Here the accountant's state is persisted by the caller (e.g.
in the ClientApp's `context.state`) and restored each round, so a node's epsilon
covers every round it has trained in.

The accountant state is Opacus's own `state_dict` in JSON types:
``{"mechanism": "rdp", "history": [[noise_multiplier, sample_rate, steps], ...]}``,
accepted as a dict, JSON text or UTF-8 bytes.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import secrets
import warnings
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedge.privacy._common import check_noise_multiplier, check_positive
from fedge.privacy._opacus import (
    AbstractGradSampleHooks,
    DPOptimizer,
    PrivacyEngine,
    RDPAccountant,
)
from fedge.privacy._per_sample import FedgePrivacyEngine
from fedge.privacy.accountant import check_step, rdp_epsilon

AccountantState = Mapping[str, Any] | bytes | str

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def _keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks instead of handing them back to the OS each step.

    Per-sample gradients are allocated afresh each step (batch × parameters: 0.6 MB
    for the digits CNN's second conv at batch 32, 2.4 MB at batch 128, 4 MB for its
    first linear layer where that is not factored) and freed by the next step.
    With glibc's default thresholds such blocks are mmap'ed and unmapped, or the heap
    is trimmed, every step: about 2000 page faults a step at batch 128 (at batch 32
    fedge's per-sample paths now stay under glibc's dynamic threshold), a third or
    more of the private step's extra time. Pinning the mmap threshold at glibc's own
    cap for its dynamic threshold (32 MB) and the trim threshold at twice that keeps
    them in the heap.
    Process-wide; a no-op off glibc. Returns whether it took effect.
    """
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        glibc = None
    if not glibc:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 64 << 20))


def _load_accountant(state: AccountantState | None) -> RDPAccountant:
    """An RDP accountant holding `state`'s history (empty for None)."""
    accountant = RDPAccountant()
    if state is None:
        return accountant
    try:
        raw = json.loads(state) if isinstance(state, (bytes, str)) else state
        history = [(float(s), float(q), int(n)) for s, q, n in raw["history"]]
        mechanism = raw["mechanism"]
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"not a local-DP accountant state: {error!r}") from error
    if mechanism != accountant.mechanism():
        raise ValueError(f"not a local-DP accountant state: mechanism {mechanism!r}")
    accountant.load_state_dict({"history": history, "mechanism": mechanism})
    return accountant


def _dump_accountant(accountant: RDPAccountant) -> dict[str, Any]:
    return {
        "mechanism": accountant.mechanism(),
        "history": [[float(s), float(q), int(n)] for s, q, n in accountant.history],
    }


class LocalDP:
    """A client's private training objects for one round.

    `model` is the caller's own module (Opacus hooks attached, no
    GradSampleModule wrapper), so `state_dict()` keys are the plain names.
    Train with `optimizer` and `data_loader` (Poisson-sampled), then persist
    `state()` or `state_bytes()` and `close()` (or use as a context manager).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: DPOptimizer,
        data_loader: DataLoader,
        engine: PrivacyEngine,
        hooks: AbstractGradSampleHooks,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data_loader = data_loader
        self._engine = engine
        self._hooks: AbstractGradSampleHooks | None = hooks

    def epsilon(self, delta: float) -> float:
        """Epsilon over every round recorded in the restored state plus this one."""
        return rdp_epsilon(self._engine.accountant.history, delta)

    def state(self) -> dict[str, Any]:
        """The accountant state to persist for the next round (JSON-able)."""
        return _dump_accountant(self._engine.accountant)

    def state_bytes(self) -> bytes:
        """`state()` as UTF-8 JSON, e.g. for a Flower ConfigRecord."""
        return json.dumps(self.state()).encode()

    def close(self) -> None:
        """Remove Opacus's hooks so the model trains, evaluates and exports normally."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None

    def __enter__(self) -> LocalDP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def make_local_dp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant_state: AccountantState | None = None,
    noise_generator: torch.Generator | None = None,
) -> LocalDP:
    """Make one round of local training DP-SGD, continuing a persisted accountant.

    The gradient noise uses `noise_generator`, by default a fresh one seeded from
    `secrets`, so seeding torch for reproducibility does not make the noise
    predictable. Opacus's Poisson batch sampling still uses torch's global RNG
    (Opacus only replaces it in secure mode, which needs torchcsprng). On glibc it
    also tunes the allocator for Opacus's per-step buffers (`_keep_freed_memory`).
    Per-sample gradients, clipping and noise take fedge's faster paths
    (`fedge.privacy._per_sample`), with Opacus's mechanism and accountant.
    """
    check_noise_multiplier(noise_multiplier)
    check_positive("max_grad_norm", max_grad_norm)
    _keep_freed_memory()
    if noise_generator is None:
        noise_generator = torch.Generator().manual_seed(secrets.randbits(63))
    with warnings.catch_warnings():
        # We pick the noise generator ourselves (above); the advice does not apply.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = FedgePrivacyEngine(accountant="rdp")
    engine.accountant = _load_accountant(accountant_state)
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        noise_generator=noise_generator,
        wrap_model=False,
    )
    return LocalDP(model, dp_optimizer, dp_loader, engine, hooks)


def local_epsilon(state: AccountantState | None, delta: float) -> float:
    """Epsilon a node has spent, from its persisted state (0 before any training)."""
    return rdp_epsilon(_load_accountant(state).history, delta)


def local_budget_spent(state: AccountantState | None, *, delta: float, max_epsilon: float) -> bool:
    """Whether the node has no budget left (epsilon already at or past the limit)."""
    return local_epsilon(state, delta) >= max_epsilon


def local_would_exceed(
    state: AccountantState | None,
    *,
    delta: float,
    max_epsilon: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
) -> bool:
    """Whether training `steps` more DP-SGD steps would push epsilon past the limit.

    With Opacus's Poisson loader, sample_rate = 1 / len(loader) and one epoch is
    len(loader) steps. Stepped through Opacus's accountant, so when this says no
    the epsilon after that training is exactly what was checked here.
    """
    check_step(noise_multiplier, sample_rate)
    accountant = _load_accountant(state)
    for _ in range(steps):
        accountant.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))
    return rdp_epsilon(accountant.history, delta) > max_epsilon
