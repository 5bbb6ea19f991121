"""Client-side DP-SGD: epsilon carried across rounds, plain parameter names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedge.models import ModelSpec, build_model, load_numpy_state, state_to_numpy
from fedge.models.training import train_epochs
from fedge.privacy._per_sample import FACTORS
from fedge.privacy.local_dp import (
    AccountantState,
    LocalDP,
    _keep_freed_memory,
    local_budget_spent,
    local_epsilon,
    local_would_exceed,
    make_local_dp,
)

DELTA = 1e-3
SPEC = ModelSpec("mlp", (30,), 2)
BATCH = 16
SAMPLES = 64
SAMPLE_RATE = BATCH / SAMPLES


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(SAMPLES, 30, generator=generator)
    labels = torch.randint(0, 2, (SAMPLES,), generator=generator)
    return DataLoader(TensorDataset(features, labels), batch_size=BATCH)


def _private(model: nn.Module, noise_multiplier: float, state: AccountantState | None) -> LocalDP:
    return make_local_dp(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        _loader(),
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        accountant_state=state,
        noise_generator=torch.Generator().manual_seed(1),
    )


def _train_epoch(dp: LocalDP) -> int:
    steps = 0
    for features, labels in dp.data_loader:
        dp.optimizer.zero_grad()
        nn.functional.cross_entropy(dp.model(features), labels).backward()
        dp.optimizer.step()
        steps += 1
    return steps


@pytest.mark.parametrize("second_sigma", [1.0, 1.4])
def test_epsilon_accumulates_across_rounds(second_sigma: float) -> None:
    model = build_model(SPEC)
    with _private(model, 1.0, None) as first:
        first_steps = _train_epoch(first)
        first_epsilon = first.epsilon(DELTA)
        persisted = first.state_bytes()
    weights = state_to_numpy(model)

    # Next round: a fresh model and optimizer, as a ClientApp would build.
    model = build_model(SPEC)
    load_numpy_state(model, weights)
    with _private(model, second_sigma, persisted) as second:
        second_steps = _train_epoch(second)
        second_epsilon = second.epsilon(DELTA)
        final_state = second.state()

    reference = RDPAccountant()
    for sigma, steps in [(1.0, first_steps), (second_sigma, second_steps)]:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=SAMPLE_RATE)
    assert first_steps == second_steps == SAMPLES // BATCH
    assert 0 < first_epsilon < second_epsilon
    assert second_epsilon == reference.get_epsilon(DELTA)
    assert local_epsilon(final_state, DELTA) == second_epsilon
    assert local_epsilon(json.dumps(final_state), DELTA) == second_epsilon


def test_model_keeps_plain_parameter_names() -> None:
    model = build_model(SPEC)
    names = list(model.state_dict())
    before = state_to_numpy(model)
    dp = _private(model, 1.0, None)
    assert dp.model is model
    assert list(dp.model.state_dict()) == names
    _train_epoch(dp)
    after = state_to_numpy(dp.model)
    assert list(after) == names
    assert any((after[name] != before[name]).any() for name in names)
    load_numpy_state(dp.model, before)

    # the Linear weights' per-sample gradients stay factored until the next zero_grad
    assert sum(hasattr(p, FACTORS) for p in model.parameters()) == 3
    dp.close()
    attributes = ("grad_sample", FACTORS)
    assert not any(hasattr(p, a) for p in model.parameters() for a in attributes)
    nn.functional.cross_entropy(model(torch.randn(4, 30)), torch.tensor([0, 1, 0, 1])).backward()
    assert not any(hasattr(p, a) for p in model.parameters() for a in attributes)


def test_budget_checks() -> None:
    assert not local_budget_spent(None, delta=DELTA, max_epsilon=1.0)
    assert local_epsilon(None, DELTA) == 0.0

    with _private(build_model(SPEC), 1.0, None) as dp:
        steps = _train_epoch(dp)
        state = dp.state()
    spent = local_epsilon(state, DELTA)
    assert not local_budget_spent(state, delta=DELTA, max_epsilon=spent * 1.01)
    assert local_budget_spent(state, delta=DELTA, max_epsilon=spent)

    next_round = {"noise_multiplier": 1.0, "sample_rate": SAMPLE_RATE, "steps": steps}
    with _private(build_model(SPEC), 1.0, state) as dp:
        _train_epoch(dp)
        after = dp.epsilon(DELTA)
    assert local_would_exceed(state, delta=DELTA, max_epsilon=(spent + after) / 2, **next_round)
    assert not local_would_exceed(state, delta=DELTA, max_epsilon=after, **next_round)


@pytest.mark.parametrize(
    "state",
    [b"not json", {"history": []}, {"mechanism": "gdp", "history": []}, {"mechanism": "rdp"}],
)
def test_rejects_malformed_state(state: AccountantState) -> None:
    with pytest.raises(ValueError, match="not a local-DP accountant state"):
        local_epsilon(state, DELTA)


def test_node_ledger_survives_runs_and_is_per_dataset(tmp_path: Path, monkeypatch) -> None:
    """ε belongs to the node's data: a new run (fresh context.state) continues it."""
    from flwr.app import Context, RecordDict

    from fedge.client_app.local_ledger import NodeLedger
    from fedge.config import FedgeConfig

    monkeypatch.setenv("FEDGE_NODE_STATE_DIR", str(tmp_path))
    node = {"partition-id": 1, "num-partitions": 4}

    def ledger_for(**run_config: object) -> NodeLedger:
        context = Context(0, 7, node, RecordDict(), {})
        return NodeLedger.for_node(FedgeConfig.from_run_config(run_config), context)

    first = ledger_for(**{"run-name": "a"})
    state = b'{"mechanism": "rdp", "history": [[1.0, 0.1, 5]]}'
    first.save(state)
    assert ledger_for(**{"run-name": "b", "resume": False}).load(DELTA) == state
    assert ledger_for(dataset="breast-cancer").path != first.path
    assert first.path.parent == tmp_path


def test_private_steps_do_not_page_fault_their_buffers() -> None:
    """Per-sample gradients (several MB a step at batch 128) are reused, not re-faulted.

    Without `_keep_freed_memory` glibc maps fresh pages in for them: 1,100 to 2,600
    faults a step here at batch 128 (measured), against about 0 with it once the heap
    has grown to its working size (the first steps, left out, fault while it grows).
    """
    resource = pytest.importorskip("resource")
    batch = 128
    model = build_model(ModelSpec("cnn", (1, 8, 8), 10))
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    loader = DataLoader(TensorDataset(features, labels), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with make_local_dp(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0) as dp:
        if not _keep_freed_memory():
            pytest.skip("allocator tuning is glibc-only")
        faults = []
        for _ in range(16):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            dp.optimizer.zero_grad()
            nn.functional.cross_entropy(dp.model(features), labels).backward()
            dp.optimizer.step()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    measured = sorted(faults[4:])
    assert measured[len(measured) // 2] < 100, faults


def test_fedprox_pulls_dp_sgd_towards_the_global_model() -> None:
    """Opacus overwrites gradients, so FedProx must act after each private step."""
    distances = {}
    for mu in (0.0, 5.0):
        torch.manual_seed(0)
        model = build_model(SPEC)
        anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
        with _private(model, 0.0, None) as dp:
            train_epochs(dp.model, dp.data_loader, dp.optimizer, 3, mu, private=True)
        distances[mu] = sum(
            float(((p.detach() - anchor[name]) ** 2).sum()) for name, p in model.named_parameters()
        )
    assert distances[5.0] < 0.5 * distances[0.0]
