"""SecAgg+ wired into Flower: FedgeAvg + fedge's ClientApp handlers, end to end.

Two harnesses:
- `SecAggGrid`, an in-memory Grid that delivers every message to the real
  ClientApp (`fedge.client_app.app`) in this thread, after a round trip
  through Flower's protobuf wire format, and can kill or tamper with nodes.
  It stands in for the network only: the strategy, the protocol and the
  client handlers all run for real. Local training is replaced by known
  updates, so the exact expected result is known.
- `run_inprocess` (Flower's Simulation Engine on Ray): the full ServerApp and
  ClientApp on digits, secagg=true against secagg=false at the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity
from grids import node_contexts
from numpy.typing import NDArray

from fedge.client_app import app as client_app
from fedge.client_app import secure_client
from fedge.client_app.protocol import WEIGHT_KEY
from fedge.config import FedgeConfig
from fedge.models import load_model, state_to_numpy
from fedge.records import MASKED_KEY, SECAGG_PAYLOAD_KEY, NamedArrays, to_array_record
from fedge.secagg import MaskedInput, Stage, quantization_error_bound
from fedge.server_app.secure_round import SecAggSettings
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import NodeGrid, run_inprocess

# --- in-memory grid: real strategy, protocol and client handlers -------------------------

NODES = tuple(range(101, 108))  # 7 nodes
MAX_WEIGHT = 100
CLIP = 1.0  # quantizer range; every update below stays far inside it
SHAPES = {"conv.weight": (4, 3, 2), "conv.bias": (4,), "fc.weight": (5, 6), "fc.bias": (5,)}


def _arrays(seed: int, scale: float) -> NamedArrays:
    rng = np.random.default_rng(seed)
    return {n: (rng.normal(size=s) * scale).astype(np.float32) for n, s in SHAPES.items()}


GLOBAL = _arrays(0, 1.0)
UPDATES = {node: _arrays(node, 0.05) for node in NODES}
WEIGHTS = {node: 10 * (i + 1) for i, node in enumerate(NODES)}  # 10, 20, ..., 70


def expected_model(members: Iterable[int]) -> NamedArrays:
    """GLOBAL + Σ n_k Δ_k / Σ n_k over `members`, in float64."""
    members = list(members)
    total = sum(WEIGHTS[k] for k in members)
    return {
        name: GLOBAL[name].astype(np.float64)
        + sum(WEIGHTS[k] * UPDATES[k][name].astype(np.float64) for k in members) / total
        for name in GLOBAL
    }


def assert_within_quantization(got: ArrayRecord | None, members: list[int], sampled: int) -> None:
    """The decoded mean is off by < N·s / Σn_k per coordinate (quantize's bound, N
    = sampled clients), plus one float32 rounding of the new weights."""
    assert got is not None
    want = expected_model(members)
    bound = quantization_error_bound(sampled, MAX_WEIGHT, CLIP) / sum(WEIGHTS[k] for k in members)
    arrays = {name: got[name].numpy() for name in got}
    assert arrays.keys() == want.keys()
    for name, value in arrays.items():
        assert value.dtype == np.float32 and value.shape == GLOBAL[name].shape
        error = np.abs(value.astype(np.float64) - want[name])
        slack = bound + np.spacing(np.abs(want[name]).astype(np.float32))
        assert np.all(error <= slack), (name, float(error.max()), bound)


def distance_to(got: ArrayRecord, members: list[int]) -> float:
    want = expected_model(members)
    return max(float(np.abs(got[n].numpy() - want[n]).max()) for n in want)


Tamper = Callable[[Message], Message]


class SecAggGrid(NodeGrid):
    """Delivers each message to fedge's ClientApp handlers for node `dst_node_id`.

    Every message and reply crosses Flower's protobuf wire format. `kill_at`
    makes nodes vanish (no reply, ever again) from the first message of that
    type on; `tamper` rewrites one node's reply to one message type.
    """

    def __init__(self, nodes: Iterable[int]) -> None:
        self.contexts = node_contexts(nodes)
        super().__init__(self.contexts)
        self.kill_at: dict[int, str] = {}
        self.tamper: dict[tuple[int, str], Tamper] = {}
        self.dead: set[int] = set()
        self.sent: list[str] = []  # message types, in order

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for message in messages:
            kind = message.metadata.message_type
            node = message.metadata.dst_node_id
            self.sent.append(kind)
            if self.kill_at.get(node) == kind:
                self.dead.add(node)
            if node in self.dead:
                continue
            received = message_from_proto(message_to_proto(message))
            reply = self.handle(received, self.contexts[node])
            if (node, kind) in self.tamper:
                reply = self.tamper[node, kind](reply)
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies

    @staticmethod
    def handle(message: Message, context: Context) -> Message:
        """The masked-input stage gets a known update instead of local training."""
        if message.metadata.message_type == f"train.{Stage.MASKED_INPUT.value}":
            node = context.node_id
            metrics = MetricRecord({WEIGHT_KEY: WEIGHTS[node]})
            return secure_client.masked_input(message, context, lambda: (UPDATES[node], metrics))
        return client_app(message, context)  # fedge's ClientApp routes setup/share/unmask


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages carry the ServerApp task's identity (Flower sets it at runtime)."""
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def secure_strategy(num_shares: int = 0) -> FedgeAvg:
    settings = SecAggSettings(
        num_shares=num_shares, threshold=0, max_weight=MAX_WEIGHT, clip_norm=CLIP, timeout=60
    )
    return FedgeAvg(
        secagg=settings,
        fraction_evaluate=0.0,
        min_train_nodes=2,
        min_available_nodes=2,
    )


def train_round(
    strategy: FedgeAvg, grid: SecAggGrid
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One training round exactly as Flower's `Strategy.start` runs it."""
    messages = strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages, timeout=60)
    return strategy.aggregate_train(1, replies)


STAGES = [f"train.{stage.value}" for stage in Stage]


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("num_shares", [0, 5], ids=["complete-graph", "5-neighbours"])
def test_all_clients_round_is_the_weighted_mean_and_reveals_no_update(num_shares: int) -> None:
    grid = SecAggGrid(NODES)
    strategy = secure_strategy(num_shares)
    arrays, metrics = train_round(strategy, grid)
    assert_within_quantization(arrays, list(NODES), len(NODES))
    # the four protocol stages, each to every node, in order
    assert grid.sent == [kind for kind in STAGES for _ in NODES]
    assert metrics is None  # no per-client metric leaves the secure round
    report = strategy.report
    assert (report.num_sampled, report.num_replies, report.num_rejected) == (7, 7, 0)
    assert report.aggregated


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize(
    ("min_bytes", "expected_thread"),
    [(0, "secagg-mask"), (secure_client.BACKGROUND_MASK_BYTES, "MainThread")],
    ids=["expanded-while-training", "small-masks-inline"],
)
def test_masks_expanded_while_training_sum_the_same(
    monkeypatch: pytest.MonkeyPatch, min_bytes: int, expected_thread: str
) -> None:
    monkeypatch.setattr(secure_client, "BACKGROUND_MASK_BYTES", min_bytes)
    threads: list[str] = []
    expand = MaskedInput.mask

    def recording_thread(stage: MaskedInput) -> NDArray[np.uint32]:
        threads.append(threading.current_thread().name)
        return expand(stage)

    monkeypatch.setattr(MaskedInput, "mask", recording_thread)
    arrays, _ = train_round(secure_strategy(5), SecAggGrid(NODES))
    assert_within_quantization(arrays, list(NODES), len(NODES))
    assert len(threads) == len(NODES)
    assert all(name.startswith(expected_thread) for name in threads)


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("num_shares", [0, 5], ids=["complete-graph", "5-neighbours"])
def test_client_killed_after_sharing_keys_is_unmasked_away(num_shares: int) -> None:
    """Its pairwise masks sit in every partner's upload; the server rebuilds its
    mask key from the survivors' shares and the sum is the survivors' mean."""
    grid = SecAggGrid(NODES)
    victim = NODES[-1]  # the heaviest weight: including it by mistake shows clearly
    grid.kill_at[victim] = f"train.{Stage.MASKED_INPUT.value}"
    strategy = secure_strategy(num_shares)
    arrays, _ = train_round(strategy, grid)

    survivors = [node for node in NODES if node != victim]
    assert_within_quantization(arrays, survivors, len(NODES))
    assert arrays is not None and distance_to(arrays, list(NODES)) > 1e-3
    assert grid.sent.count(f"train.{Stage.UNMASK.value}") == len(survivors)
    report = strategy.report
    assert (report.num_replies, report.num_rejected) == (6, 1)
    assert set(report.rejected) == {victim}
    assert "no reply" in report.rejected[victim]


def _replace_masked(reply: Message, value: np.ndarray) -> Message:
    reply.content.array_records[MASKED_KEY] = ArrayRecord({MASKED_KEY: Array(value)})
    return reply


def _masked(reply: Message) -> np.ndarray:
    return reply.content.array_records[MASKED_KEY][MASKED_KEY].numpy()


def _corrupt_first_ciphertext(reply: Message) -> Message:
    record = reply.content.config_records[SECAGG_PAYLOAD_KEY]
    ciphertexts = list(record["ciphertexts"])  # type: ignore[arg-type]
    first = bytearray(ciphertexts[0])
    first[-1] ^= 1
    ciphertexts[0] = bytes(first)
    record["ciphertexts"] = ciphertexts
    return reply


def _relabel(reply: Message, stage: Stage) -> Message:
    reply.content.config_records[SECAGG_PAYLOAD_KEY]["stage"] = stage.value
    return reply


TAMPERINGS: dict[str, tuple[Stage, Tamper, str]] = {
    "int64-dtype": (
        Stage.MASKED_INPUT,
        lambda r: _replace_masked(r, _masked(r).astype(np.int64)),
        "uint32",
    ),
    "float32-dtype": (
        Stage.MASKED_INPUT,
        lambda r: _replace_masked(r, _masked(r).astype(np.float32)),
        "uint32",
    ),
    "short-vector": (Stage.MASKED_INPUT, lambda r: _replace_masked(r, _masked(r)[:-1]), "shape"),
    "long-vector": (
        Stage.MASKED_INPUT,
        lambda r: _replace_masked(r, np.append(_masked(r), np.uint32(0))),
        "shape",
    ),
    "wrong-stage-label": (
        Stage.MASKED_INPUT,
        lambda r: _relabel(r, Stage.SHARE_KEYS),
        "expected stage",
    ),
}


@pytest.mark.usefixtures("serverapp_identity")
@pytest.mark.parametrize("kind", list(TAMPERINGS))
def test_tampered_reply_drops_only_its_sender(kind: str) -> None:
    stage, tamper, reason = TAMPERINGS[kind]
    grid = SecAggGrid(NODES)
    attacker = NODES[-1]
    grid.tamper[attacker, f"train.{stage.value}"] = tamper
    strategy = secure_strategy()  # complete graph: enough holders even without the victim
    arrays, _ = train_round(strategy, grid)

    honest = [node for node in NODES if node != attacker]
    assert_within_quantization(arrays, honest, len(NODES))
    assert arrays is not None and distance_to(arrays, list(NODES)) > 1e-3
    report = strategy.report
    assert (report.num_replies, report.num_rejected) == (6, 1)
    assert set(report.rejected) == {attacker}
    assert reason in report.rejected[attacker]


@pytest.mark.usefixtures("serverapp_identity")
def test_forged_share_drops_its_sender_and_the_receiver_not_the_receiver_alone() -> None:
    """A forged share for one peer: that peer reports the sender; either may lie, so the
    server drops both, although both well-formed masked uploads did arrive."""
    grid = SecAggGrid(NODES)
    attacker = NODES[-1]
    grid.tamper[attacker, f"train.{Stage.SHARE_KEYS.value}"] = _corrupt_first_ciphertext
    strategy = secure_strategy()
    arrays, _ = train_round(strategy, grid)
    victim = min(set(NODES) - {attacker})  # the first receiver: receivers come sorted
    honest = [node for node in NODES if node not in (attacker, victim)]
    assert_within_quantization(arrays, honest, len(NODES))
    assert set(strategy.report.rejected) == {attacker, victim}
    assert "authentication" in strategy.report.rejected[attacker]


def _wrong_first_seed_share(reply: Message) -> Message:
    record = reply.content.config_records[SECAGG_PAYLOAD_KEY]
    shares = list(record["seed_shares"])  # type: ignore[arg-type]
    shares[0] = (int.from_bytes(shares[0], "big") ^ 1).to_bytes(len(shares[0]), "big")
    record["seed_shares"] = shares
    return reply


@pytest.mark.usefixtures("serverapp_identity")
def test_wrong_unmask_share_is_outvoted_and_its_sender_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """7 holders, t = 5: the commitment picks 5 right shares, the round sums everyone."""
    grid = SecAggGrid(NODES)
    attacker = NODES[-1]
    grid.tamper[attacker, f"train.{Stage.UNMASK.value}"] = _wrong_first_seed_share
    strategy = secure_strategy()
    arrays, _ = train_round(strategy, grid)
    assert_within_quantization(arrays, list(NODES), len(NODES))
    assert f"node {attacker} misbehaved after its upload" in caplog.text
    assert "wrong share" in caplog.text


@pytest.mark.usefixtures("serverapp_identity")
def test_fewer_survivors_than_threshold_leaves_the_model_unchanged() -> None:
    nodes = NODES[:5]  # complete graph: 5 shares, threshold 4
    assert secure_strategy().secagg.shape(5) == (5, 4)  # type: ignore[union-attr]
    grid = SecAggGrid(nodes)
    for victim in nodes[:2]:
        grid.kill_at[victim] = f"train.{Stage.MASKED_INPUT.value}"

    strategy = secure_strategy()
    assert train_round(strategy, grid) == (None, None)
    assert not strategy.report.aggregated
    assert f"train.{Stage.UNMASK.value}" not in grid.sent  # aborted before unmasking

    # in Flower's own round loop the global model stays what it was
    grid = SecAggGrid(nodes)
    for victim in nodes[:2]:
        grid.kill_at[victim] = f"train.{Stage.MASKED_INPUT.value}"
    seen: dict[int, NamedArrays] = {}

    def record(server_round: int, arrays: ArrayRecord) -> None:
        seen[server_round] = {name: arrays[name].numpy() for name in arrays}

    strategy = secure_strategy()
    strategy.start(grid, to_array_record(GLOBAL), num_rounds=1, evaluate_fn=record)
    assert sorted(seen) == [0, 1] and not strategy.report.aggregated
    assert all(np.array_equal(seen[1][name], GLOBAL[name]) for name in GLOBAL)
    # ... while 4 survivors (= threshold) are enough
    grid = SecAggGrid(nodes)
    grid.kill_at[nodes[0]] = f"train.{Stage.MASKED_INPUT.value}"
    strategy = secure_strategy()
    arrays, _ = train_round(strategy, grid)
    assert_within_quantization(arrays, list(nodes[1:]), len(nodes))


@pytest.mark.usefixtures("serverapp_identity")
def test_dropout_before_key_sharing_trains_only_the_rest() -> None:
    """A node gone at setup never gets a training message; the round still works."""
    grid = SecAggGrid(NODES)
    grid.kill_at[NODES[0]] = f"train.{Stage.SETUP.value}"
    strategy = secure_strategy()
    arrays, _ = train_round(strategy, grid)
    assert grid.sent.count(f"train.{Stage.MASKED_INPUT.value}") == len(NODES) - 1
    assert_within_quantization(arrays, list(NODES[1:]), len(NODES))
    assert strategy.report.num_replies == len(NODES) - 1


@pytest.mark.usefixtures("serverapp_identity")
def test_keys_are_shared_a_round_ahead_when_the_clients_stay_the_same() -> None:
    """Round r+1's setup rides on round r's training messages and its key sharing on
    round r's unmask requests, so such a round takes three exchanges (training,
    consistency, unmask).

    A node that misses round 1's unmask exchange (its upload still counts) misses
    round 2's key sharing: round 2 then shares keys itself, with it; round 3 is
    back to three exchanges. Every round's sum is checked.
    """
    grid = SecAggGrid(NODES)
    grid.kill_at[NODES[0]] = f"train.{Stage.UNMASK.value}"
    strategy = secure_strategy(num_shares=5)
    pipelined = [f"train.{s.value}" for s in (Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK)]
    for stages in (STAGES, STAGES, pipelined):
        grid.sent.clear()
        arrays, _ = train_round(strategy, grid)
        assert_within_quantization(arrays, list(NODES), len(NODES))
        assert grid.sent == [kind for kind in stages for _ in NODES]
        grid.dead.clear()
        grid.kill_at.clear()


@pytest.mark.usefixtures("serverapp_identity")
def test_keys_shared_ahead_are_not_used_under_other_parameters() -> None:
    """Clients agreed to the last round's parameters (here the clip range changes)."""
    grid = SecAggGrid(NODES)
    strategy = secure_strategy()
    train_round(strategy, grid)
    assert strategy.secagg is not None
    strategy.secagg = dataclasses.replace(strategy.secagg, clip_norm=2 * CLIP)
    grid.sent.clear()
    arrays, _ = train_round(strategy, grid)
    assert arrays is not None and distance_to(arrays, list(NODES)) < 1e-5
    assert grid.sent == [kind for kind in STAGES for _ in NODES]


# --- Ray: the full ServerApp and ClientApp on digits -------------------------------------

SIM_NODES = 10
SIM_CLIP = 50.0  # far above any client's update norm here, so nothing is clipped
SIM_CONFIG = {
    "partitioner": "iid",
    "seed": 11,
    "local-epochs": 1,
    "secagg-clip-norm": SIM_CLIP,
    "norm-bound": 0.0,  # the plain run is the weighted mean the secure one computes
    "weight-bound": 0.0,
}


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def simulate(root: Path, name: str, rounds: int, **extra: Any) -> Path:
    config = {**SIM_CONFIG, "num-server-rounds": rounds, "output-dir": str(root), "run-name": name}
    run_inprocess({**config, **extra}, num_supernodes=SIM_NODES)
    return root / name


def final_arrays(run_dir: Path) -> NamedArrays:
    return state_to_numpy(load_model(run_dir / "final_model.pt")[0])


def total_examples() -> int:
    """Σ n_k of one round: every node's training-split size."""
    from fedge.client_app.local_data import local_data

    config = FedgeConfig.from_run_config(SIM_CONFIG)
    return sum(
        len(
            local_data(
                config,
                Context(
                    run_id=0,
                    node_id=pid,
                    node_config={"partition-id": pid, "num-partitions": SIM_NODES},
                    state=RecordDict(),
                    run_config={},
                ),
            ).y_train
        )
        for pid in range(SIM_NODES)
    )


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secagg-sim")


def test_secure_round_matches_plain_fedavg_within_quantization(sim_root: Path) -> None:
    plain = final_arrays(simulate(sim_root, "plain", rounds=1))
    secure_dir = simulate(sim_root, "secure", rounds=1, secagg=True)
    secure = final_arrays(secure_dir)

    # The secure mean is Σ n_k Δ_k (off by < N·s per coordinate, s the quantizer
    # step, see fedge.secagg.quantize) divided by Σ n_k; both runs then add it to
    # the same float32 model in float64 and round once to float32, so they differ
    # by at most that plus one float32 spacing of the result.
    config = FedgeConfig.from_run_config(SIM_CONFIG)
    bound = quantization_error_bound(SIM_NODES, config.max_num_examples, SIM_CLIP)
    tolerance = bound / total_examples()
    assert 0 < tolerance < 1e-4  # tight: any real difference in the sum shows
    assert plain.keys() == secure.keys()
    for name, value in plain.items():
        slack = tolerance + np.spacing(np.abs(value))
        error = np.abs(secure[name].astype(np.float64) - value.astype(np.float64))
        assert np.all(error <= slack), (name, float(error.max()), tolerance)
    # quantization noise is there: the secure path did run (not bit-identical)
    assert any(not np.array_equal(plain[n], secure[n]) for n in plain)

    rows = read_rows(secure_dir)
    assert len(rows) == 1 and rows[0]["aggregated"] is True
    assert (rows[0]["num_replies"], rows[0]["num_rejected"]) == (SIM_NODES, 0)
    assert rows[0]["train_loss"] is None  # per-client losses stay hidden


def test_secure_run_keeps_every_client_and_learns(sim_root: Path) -> None:
    """Continues the 1-round secure run above to round 3 (same config, resumed)."""
    if not (sim_root / "secure" / "final_model.pt").exists():
        simulate(sim_root, "secure", rounds=1, secagg=True)
    run_dir = simulate(sim_root, "secure", rounds=3, secagg=True, resume=True)
    rows = read_rows(run_dir)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert all((r["num_replies"], r["num_rejected"]) == (SIM_NODES, 0) for r in rows)
    assert all(r["aggregated"] for r in rows)
    assert rows[-1]["test_accuracy"] >= 0.6  # chance is 0.1
    assert math.isfinite(rows[-1]["test_loss"]) and rows[-1]["test_loss"] < rows[0]["test_loss"]
