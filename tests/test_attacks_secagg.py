"""One malicious client inside SecAgg+: crafted levels and weight entries, a skipped
clip, and an update exactly at the bound. The real strategy, protocol and client
handlers run (test_secagg_flower's SecAggGrid); only the attacker's encoding is
hooked. A sum no honest set of clients could produce leaves the model unchanged
with the reason in the log and the round report."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from flwr.app import Context, Message
from numpy.typing import NDArray
from test_secagg_flower import (
    CLIP,
    GLOBAL,
    MAX_WEIGHT,
    NODES,
    WEIGHTS,
    SecAggGrid,
    assert_within_quantization,
    secure_strategy,
    serverapp_identity,
    train_round,
)

from fedge.config import FedgeConfig
from fedge.models import build_model, state_to_numpy
from fedge.privacy.clipping import global_norm
from fedge.records import to_array_record
from fedge.secagg import Quantizer
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.recorder import RoundRecorder
from fedge.server_app.robust import SecureBounds
from fedge.server_app.run_folder import RunFolder
from fedge.server_app.strategy import FedgeAvg
from fedge.task import dataset_for, model_spec_for

pytestmark = pytest.mark.usefixtures("serverapp_identity")
assert serverapp_identity  # the fixture, imported for its side effect

ATTACKER = NODES[0]
HONEST = NODES[1:]
Encode = Callable[[Quantizer, NDArray[np.floating], int], NDArray[np.uint32]]
_honest_encode = Quantizer.encode


def _honest_weight_total(quantizer: Quantizer) -> int:
    return sum(min(WEIGHTS[node], quantizer.max_weight) for node in HONEST)


def levels_at_max(
    quantizer: Quantizer, update: NDArray[np.floating], weight: int
) -> NDArray[np.uint32]:
    out = np.full(update.size + 1, quantizer.max_level, np.uint32)
    out[-1] = min(weight, quantizer.max_weight)
    return out


def levels_wrapping(
    quantizer: Quantizer, update: NDArray[np.floating], weight: int
) -> NDArray[np.uint32]:
    out = np.full(update.size + 1, 2**31 - 1, np.uint32)
    out[-1] = min(weight, quantizer.max_weight)
    return out


def weight_total(target: int) -> Encode:
    """Honest levels, and a weight entry making Σn = target (mod 2^32)."""

    def encode(
        quantizer: Quantizer, update: NDArray[np.floating], weight: int
    ) -> NDArray[np.uint32]:
        out = _honest_encode(quantizer, update, weight)
        out[-1] = np.uint32((target - _honest_weight_total(quantizer)) % 2**32)
        return out

    return encode


def skipped_clip(
    quantizer: Quantizer, update: NDArray[np.floating], weight: int
) -> NDArray[np.uint32]:
    """×1e6 and no L2 clip: only the quantizer's per-coordinate range limits it."""
    return _honest_encode(quantizer, update * 1e6, quantizer.max_weight)


def at_bound(quantizer: Quantizer, update: NDArray[np.floating], weight: int) -> NDArray[np.uint32]:
    """Sign-flipped and scaled to exactly the clip norm, at the maximum weight."""
    return _honest_encode(quantizer, -update * (CLIP / np.linalg.norm(update)), MAX_WEIGHT)


class AttackGrid(SecAggGrid):
    """SecAggGrid whose `ATTACKER` encodes its masked input with `encode`."""

    def __init__(self, encode: Encode) -> None:
        super().__init__(NODES)
        self.encode = encode

    def handle(self, message: Message, context: Context) -> Message:
        if context.node_id == ATTACKER:
            with mock.patch.object(Quantizer, "encode", self.encode):
                return SecAggGrid.handle(message, context)
        return SecAggGrid.handle(message, context)


REFUSED = {
    "levels-at-max": (levels_at_max, "exceeds"),
    "levels-2^31-1": (levels_wrapping, "beyond any honest sum"),
    "weight-sum-1": (weight_total(1), "weight total 1 outside"),
    "weight-sum-0": (weight_total(0), "weight total 0 outside"),
    "skipped-clip-x1e6": (skipped_clip, "exceeds"),
}


@pytest.mark.parametrize("attack", sorted(REFUSED))
def test_a_sum_no_honest_clients_produce_leaves_the_model_unchanged_and_says_why(
    attack: str, caplog: pytest.LogCaptureFixture
) -> None:
    encode, reason = REFUSED[attack]
    strategy = secure_strategy()
    with caplog.at_level(logging.WARNING):
        arrays, metrics = train_round(strategy, AttackGrid(encode))
    assert (arrays, metrics) == (None, None)
    assert not strategy.report.aggregated
    assert reason in (strategy.report.skip_reason or "")
    assert "SecAgg sum refused" in caplog.text and "stays unchanged" in caplog.text


def test_without_the_checks_the_same_attacks_take_over_the_model() -> None:
    """What the attacks did before: each moves the mean beyond twice the clip norm."""
    for attack in ("levels-at-max", "levels-2^31-1", "weight-sum-1", "skipped-clip-x1e6"):
        strategy = secure_strategy()
        with mock.patch("fedge.server_app.robust.SecureBounds.problem", return_value=None):
            arrays, _ = train_round(strategy, AttackGrid(REFUSED[attack][0]))
        assert arrays is not None
        moved = {n: arrays[n].numpy().astype(np.float64) - GLOBAL[n] for n in GLOBAL}
        assert global_norm(moved) > 2 * CLIP, attack


def test_an_update_at_the_bound_is_applied_and_moves_the_mean_at_most_the_clip_norm() -> None:
    """What remains possible inside SecAgg: an in-bound adversarial update."""
    strategy = secure_strategy()
    arrays, _ = train_round(strategy, AttackGrid(at_bound))
    assert arrays is not None and strategy.report.skip_reason is None
    moved = {n: arrays[n].numpy().astype(np.float64) - GLOBAL[n] for n in GLOBAL}
    assert global_norm(moved) <= CLIP * (1 + 1e-3)


def test_honest_clients_pass_the_checks() -> None:
    arrays, _ = train_round(strategy := secure_strategy(), AttackGrid(_honest_encode))
    assert strategy.report.skip_reason is None
    assert_within_quantization(arrays, list(NODES), len(NODES))


def _private_strategy() -> FedgeAvg:
    config = FedgeConfig(secagg=True, dp_mode="central", dp_clipping_norm=CLIP)
    strategy = secure_strategy()
    strategy.privacy = ServerPrivacy(config)
    return strategy


def test_under_dp_every_weight_is_one_so_the_total_must_equal_the_survivors() -> None:
    strategy = _private_strategy()
    arrays, _ = train_round(strategy, AttackGrid(weight_total(len(NODES) + 1)))
    assert arrays is None
    assert f"weight total {len(NODES) + 1} != {len(NODES)} survivors" in (
        strategy.report.skip_reason or ""
    )
    honest = _private_strategy()
    arrays, _ = train_round(honest, AttackGrid(_honest_encode))
    assert arrays is not None and honest.report.skip_reason is None


def test_the_wrap_headroom_leaves_honest_sums_in_half_the_range() -> None:
    quantizer = Quantizer(CLIP, MAX_WEIGHT, len(NODES))
    full = np.full(3, CLIP)
    total = np.zeros(4, np.uint32)
    for _ in NODES:
        total += quantizer.encode(full, MAX_WEIGHT)
    decoded, _ = quantizer.decode(total)
    assert np.all(np.abs(decoded) <= quantizer.honest_limit)
    assert quantizer.num_clients * quantizer.max_level < 2**30
    wrapped = total + np.uint32(2**31 - 1)
    assert np.abs(quantizer.decode(wrapped)[0]).max() > quantizer.honest_limit


def test_the_skip_reason_reaches_metrics_jsonl(tmp_path: Path) -> None:
    """RoundRecorder writes the round report's reason into that round's row."""
    config = FedgeConfig()
    bundle = dataset_for(config)
    spec = model_spec_for(config, bundle)
    strategy = secure_strategy()
    arrays, _ = train_round(strategy, AttackGrid(weight_total(0)))
    assert arrays is None
    recorder = RoundRecorder(
        RunFolder(tmp_path), strategy, spec, bundle, 1, {}, privacy=ServerPrivacy(config)
    )
    recorder(1, to_array_record(state_to_numpy(build_model(spec))))
    row = json.loads((tmp_path / "metrics.jsonl").read_text(encoding="utf-8"))
    assert row["aggregated"] is False
    assert "weight total 0 outside" in row["skip_reason"]


def test_distributed_dp_noise_is_allowed_for_and_nothing_beyond_it() -> None:
    """Sums of clipped updates plus each client's noise share pass; the same sum
    plus one more client's worth of clip norm in one direction does not."""
    m, d, clip, sigma = 10, 5_000, 1.0, 0.05
    bounds = SecureBounds(clip, 1, True, error_bound=0.0, honest_limit=1e9, noise_stddev=sigma)
    rng = np.random.default_rng(3)
    direction = np.ones(d) / np.sqrt(d)
    for _ in range(20):
        honest = sum(clip * direction + rng.normal(0, sigma, d) for _ in range(m))
        assert bounds.problem(honest, m, m) is None
    allowed = m * clip + m * sigma * (np.sqrt(d) + 10)
    assert bounds.problem(direction * allowed * 1.01, m, m) is not None
