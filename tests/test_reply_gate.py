"""The reply gate (issue 12, item 1): whatever a client sends, the round survives it.

Adversary: a client that sends any bytes Flower's wire format can carry — hostile
Arrays (foreign stypes, object or big-endian dtypes, npy headers that lie about
their size), odd record layouts, out-of-range metrics, replies for nodes that were
not asked or that answer twice. Each reply below is a real Flower Message handed to
`FedgeAvg.aggregate_train`; the claim checked is always the same: no exception, the
model is the honest replies' aggregate, every bad reply is counted as rejected with
a reason, and nothing is decoded (or allocated) before it is checked.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.metadata import Metadata
from flwr.supercore.task_identity import TaskIdentity
from grids import instruction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.client_app.protocol import (
    CARRIES_PARTIAL,
    DECLINED_KEY,
    LOCAL_EPSILON_KEY,
    LOSS_KEY,
    MAX_EXAMPLES_KEY,
    UNCLIPPED_KEY,
    UPDATE_INFO_KEY,
    WEIGHT_KEY,
    reported_examples,
    update_tag,
)
from fedge.records import (
    MASKED_KEY,
    SECAGG_PAYLOAD_KEY,
    NamedArrays,
    RejectedArray,
    checked_numpy,
    from_array_record,
    records_to_payload,
    to_array_record,
)
from fedge.server_app.strategy import FedgeAvg
from fedge.simulation import NodeGrid

HONEST = (1, 2, 3)
MALICIOUS = tuple(range(101, 113))  # sampled, like the honest nodes
UNSAMPLED = (900, 901)
NODES = HONEST + MALICIOUS
CAP = 1000  # max-num-examples' default


def _global() -> NamedArrays:
    rng = np.random.default_rng(0)
    shapes = {
        "features.0.weight": (64, 128),
        "features.0.bias": (64,),
        "head.weight": (10, 64),
        "head.bias": (10,),
    }
    return {name: rng.normal(size=s).astype(np.float32) for name, s in shapes.items()}


GLOBAL = _global()
MODEL_BYTES = sum(value.nbytes for value in GLOBAL.values())
HEAD = frozenset({"head.weight", "head.bias"})
NAMES = sorted(GLOBAL)


def delta(seed: int, names: Any = GLOBAL) -> NamedArrays:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(scale=0.01, size=GLOBAL[n].shape).astype(np.float32) for n in names}


@pytest.fixture(autouse=True, scope="module")
def serverapp_identity() -> Iterator[None]:
    """Instruction messages carry the sending task's identity (set by Flower at runtime)."""
    with pytest.MonkeyPatch.context() as patch:
        for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
            patch.setattr(TaskIdentity, attr, value)
        yield


# --- building replies -------------------------------------------------------------------


def weight_of(node: int) -> int:
    return 10 + node % 7  # unequal, so a wrong mix of replies shows in the mean


def reply(
    node: int,
    arrays: ArrayRecord | NamedArrays | None = None,
    metrics: MetricRecord | dict[str, Any] | None = None,
    **extra_records: Any,
) -> Message:
    """A reply as fedge's ClientApp builds it (tagged as an update of round 1's GLOBAL);
    `arrays=None` sends the node's honest update."""
    record = arrays if isinstance(arrays, ArrayRecord) else to_array_record(arrays or delta(node))
    if not isinstance(metrics, MetricRecord):
        metrics = MetricRecord(metrics or {LOSS_KEY: 0.5 + node % 3, WEIGHT_KEY: weight_of(node)})
    records = {UPDATE_INFO_KEY: tag(), **extra_records}
    content = RecordDict({"arrays": record, "metrics": metrics, **records})
    return Message(content, reply_to=instruction(node))


def tag(carries: str = "update") -> ConfigRecord:
    """The tag of a reply to round 1's GLOBAL."""
    return update_tag({"server-round": 1}, GLOBAL, carries)


def with_array(name: str, array: Array, base: NamedArrays | None = None) -> ArrayRecord:
    record = to_array_record(base or delta(7))
    record[name] = array
    return record


def forced_metrics(**values: object) -> MetricRecord:
    """Metrics whose values skip MetricRecord's own type check (bools, strings, None),
    as a hostile or future wire decoder could deliver them."""
    record = MetricRecord({WEIGHT_KEY: 10})
    record._data.update(values)
    return record


def npy(
    descr: object, fortran: object, shape: object, version: tuple[int, int] = (1, 0), pad: int = 0
) -> bytes:
    """A hand-made npy header (no data), declaring whatever it is told to."""
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, }}"
    text += " " * pad
    size_format = "<H" if version == (1, 0) else "<I"
    prefix = 6 + 2 + struct.calcsize(size_format)
    body = text.encode("latin1")
    body += b" " * (-(prefix + len(body) + 1) % 64) + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(size_format, len(body)) + body


def saved(value: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=allow_pickle)
    return buffer.getvalue()


def claimed(data: bytes, name: str = "head.bias") -> Array:
    """An Array whose declared fields are exactly right for `name`; only `data` lies."""
    reference = GLOBAL[name]
    return Array(str(reference.dtype), reference.shape, "numpy.ndarray", data)


def start_round(strategy: FedgeAvg) -> None:
    strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), NodeGrid(NODES))


def aggregate(replies: list[Message], **kwargs: Any) -> tuple[FedgeAvg, Any, Any]:
    strategy = FedgeAvg(min_train_nodes=1, min_available_nodes=1, **kwargs)
    start_round(strategy)
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, arrays, metrics


def honest_replies(nodes: tuple[int, ...] = HONEST) -> list[Message]:
    return [reply(node) for node in nodes]


@pytest.fixture(scope="module")
def honest_model() -> NamedArrays:
    _, arrays, _ = aggregate(honest_replies())
    return from_array_record(arrays)


def assert_rejected_alone(
    bad: Message, honest_model: NamedArrays, reason: str, **kwargs: Any
) -> FedgeAvg:
    """`bad` among the honest replies: dropped for `reason`, the model as without it."""
    strategy, arrays, _ = aggregate([*honest_replies()[:2], bad, *honest_replies()[2:]], **kwargs)
    assert arrays is not None
    model = from_array_record(arrays)
    assert all(np.array_equal(model[name], honest_model[name]) for name in GLOBAL)
    assert strategy.report.num_replies == len(HONEST)
    node = bad.metadata.src_node_id
    assert list(strategy.report.rejected) == [node], strategy.report.rejected
    assert reason in strategy.report.rejected[node]
    return strategy


# --- one malformed Array kills the ServerApp (no more) ----------------------------------

OBJECT_NPY = saved(np.array([1.0, "x"] * 5, dtype=object)[:10], allow_pickle=True)
HUGE = (10**9,)

MALFORMED_ARRAYS: dict[str, tuple[Array, str]] = {
    "stype torch": (
        Array("float32", (10,), "torch.Tensor", saved(np.zeros(10, np.float32))),
        "stype",
    ),
    "object dtype npy": (claimed(OBJECT_NPY), "npy dtype"),
    "bytes that are not npy": (claimed(b"not an npy file" * 3), "no valid npy header"),
    "empty bytes": (claimed(b""), "no valid npy header"),
    "header claiming 1e9 floats": (
        claimed(npy("<f4", False, HUGE) + b"\0" * 40),
        "npy shape",
    ),
    "header right, data short": (claimed(npy("<f4", False, (10,)) + b"\0" * 39), "bytes"),
    "header right, data long": (claimed(npy("<f4", False, (10,)) + b"\0" * 41), "bytes"),
    "big-endian float32": (claimed(saved(np.zeros(10, ">f4"))), "npy dtype"),
    "structured dtype": (claimed(saved(np.zeros(10, [("a", "<f4")]))), "npy dtype"),
    "fortran order": (
        claimed(npy("<f4", True, (10,)) + b"\0" * 40),
        "Fortran",
    ),
    "npy version 3": (claimed(npy("<f4", False, (10,), (3, 0)) + b"\0" * 40), "version"),
    "declared dtype float64": (Array(np.zeros(10, np.float64)), "declared dtype"),
    "declared shape wrong": (Array(np.zeros(11, np.float32)), "declared shape"),
    "header longer than the limit": (
        claimed(npy("<f4", False, (10,), pad=2000) + b"\0" * 40),
        "no valid npy header",
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED_ARRAYS))
def test_malformed_array_is_a_rejection_not_an_exception(
    kind: str, honest_model: NamedArrays
) -> None:
    array, reason = MALFORMED_ARRAYS[kind]
    bad = reply(101, with_array("head.bias", array))
    assert_rejected_alone(bad, honest_model, reason)


def test_checked_numpy_decodes_exactly_what_np_save_wrote() -> None:
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    decoded = checked_numpy(Array(value), np.dtype(np.float32), (3, 4))
    assert decoded.dtype == np.float32 and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, value)
    with pytest.raises(RejectedArray, match="declared shape"):
        checked_numpy(Array(value), np.dtype(np.float32), (4, 3))


def _peak_during(call: Callable[[], object]) -> int:
    """Bytes allocated at the peak of `call`, above what was live before it."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_a_200_mb_extra_array_is_rejected_without_being_decoded() -> None:
    huge = 200_000_000
    extra = Array("float32", (huge // 4,), "numpy.ndarray", npy("<f4", False, (huge // 4,)))
    extra.data += bytes(huge)  # a well-formed 200 MB array under a name the model lacks
    bad = reply(101, with_array("extra", extra))
    strategy = FedgeAvg(min_train_nodes=1, min_available_nodes=1)
    start_round(strategy)
    replies = [*honest_replies(), bad]
    peak = _peak_during(lambda: strategy.aggregate_train(1, replies))
    assert "unknown arrays 'extra'" in strategy.report.rejected[101]
    assert peak < 20 * MODEL_BYTES, peak  # decoding would allocate 200 MB


def test_a_header_claiming_1e9_floats_allocates_nothing_of_that_size() -> None:
    lie = claimed(npy("<f4", False, HUGE) + b"\0" * 40, "features.0.weight")
    strategy = FedgeAvg(min_train_nodes=1, min_available_nodes=1)
    start_round(strategy)
    replies = [*honest_replies(), reply(101, with_array("features.0.weight", lie))]
    peak = _peak_during(lambda: strategy.aggregate_train(1, replies))
    assert "npy shape" in strategy.report.rejected[101]
    assert peak < 20 * MODEL_BYTES, peak


# --- num-examples: positive integers up to the public cap -------------------------------

BAD_WEIGHTS: dict[str, object] = {
    "2^63-1": 2**63 - 1,
    "1e308": 1e308,
    "1e15": 1e15,
    "cap + 1": CAP + 1,
    "zero": 0,
    "negative": -3,
    "float ten": 10.0,
    "nan": math.nan,
    "list": [10],
}


@pytest.mark.parametrize("kind", sorted(BAD_WEIGHTS))
def test_num_examples_outside_1_to_cap_is_rejected(kind: str, honest_model: NamedArrays) -> None:
    bad = reply(101, metrics={LOSS_KEY: 0.5, WEIGHT_KEY: BAD_WEIGHTS[kind]})
    assert_rejected_alone(bad, honest_model, "max-num-examples")


@pytest.mark.parametrize("value", [True, "10", None])
def test_num_examples_of_a_foreign_type_is_rejected(
    value: object, honest_model: NamedArrays
) -> None:
    metrics = forced_metrics(**{WEIGHT_KEY: value})
    assert_rejected_alone(reply(101, metrics=metrics), honest_model, WEIGHT_KEY)


def test_num_examples_at_the_cap_counts_with_weight_cap() -> None:
    updates = {101: delta(101), 102: delta(102)}
    replies = [
        reply(101, updates[101], {LOSS_KEY: 1.0, WEIGHT_KEY: 250}),
        reply(102, updates[102], {LOSS_KEY: 1.0, WEIGHT_KEY: 750}),
    ]
    strategy, arrays, _ = aggregate(replies, max_num_examples=750)
    assert strategy.report.rejected == {}
    model = from_array_record(arrays)
    for name in GLOBAL:
        mean = (250 * updates[101][name].astype(np.float64) + 750 * updates[102][name]) / 1000
        expected = (GLOBAL[name].astype(np.float64) + mean).astype(np.float32)
        np.testing.assert_allclose(model[name], expected, rtol=1e-6, atol=1e-7)


def test_the_cap_is_sent_to_clients_who_report_at_most_it() -> None:
    strategy = FedgeAvg(max_num_examples=64)
    grid = NodeGrid(NODES)
    messages = list(strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), grid))
    config = messages[0].content.config_records["config"]
    assert config[MAX_EXAMPLES_KEY] == 64
    assert reported_examples(500, config) == 64
    assert reported_examples(10, config) == 10
    assert reported_examples(500, ConfigRecord()) == 500  # a stock strategy sends no cap
    assert reported_examples(500, ConfigRecord({MAX_EXAMPLES_KEY: 0})) == 500


def test_torch_client_reports_its_examples_capped() -> None:
    from grids import node_contexts

    from fedge.client_app.local_data import local_data
    from fedge.client_app.torch_client import local_update
    from fedge.config import FedgeConfig
    from fedge.models import build_model, state_to_numpy
    from fedge.task import dataset_for, model_spec_for

    config = FedgeConfig.from_run_config({"local-epochs": 1, "max-num-examples": 7})
    context = node_contexts(range(1, 11), config.to_run_config())[1]
    spec = model_spec_for(config, dataset_for(config))
    content = RecordDict(
        {
            "arrays": to_array_record(state_to_numpy(build_model(spec))),
            "config": ConfigRecord({"server-round": 1, MAX_EXAMPLES_KEY: 7}),
        }
    )
    _, metrics = local_update(
        Message(content, dst_node_id=1, message_type="train"), context, config
    )
    assert len(local_data(config, context).y_train) > 7
    assert metrics[WEIGHT_KEY] == 7


def test_edge_client_reports_its_examples_capped() -> None:
    from grids import node_contexts

    from fedge.client_app.local_data import local_data
    from fedge.client_app.protocol import REPLY_KEY
    from fedge.config import FedgeConfig
    from fedge.edge import client as edge_client
    from fedge.edge.broadcast import BACKBONE_KEY, backbone_payload
    from fedge.models import ModelSpec, build_model, state_to_numpy

    config = FedgeConfig.from_run_config({"local-epochs": 1})
    context = node_contexts(range(1, 11), config.to_run_config())[1]
    spec = ModelSpec("cnn", (1, 8, 8), 10)  # digits
    arrays = state_to_numpy(build_model(spec))
    train_config = {
        REPLY_KEY: "update",
        "server-round": 1,
        BACKBONE_KEY: backbone_payload(spec, arrays),
        MAX_EXAMPLES_KEY: 7,
    }
    content = RecordDict({"arrays": to_array_record(arrays), "config": ConfigRecord(train_config)})
    answer = edge_client.train(
        Message(content, dst_node_id=1, message_type="train"), context, config
    )
    assert len(local_data(config, context).y_train) > 7
    assert answer.content.metric_records["metrics"][WEIGHT_KEY] == 7


# --- who may reply: sampled nodes, once -------------------------------------------------


def test_a_reply_from_a_node_not_sampled_is_rejected(honest_model: NamedArrays) -> None:
    assert_rejected_alone(reply(UNSAMPLED[0]), honest_model, "not sampled")


def test_every_reply_of_a_node_that_answers_twice_is_dropped(honest_model: NamedArrays) -> None:
    twice = [reply(101, delta(1)), reply(101, delta(2))]
    strategy, arrays, _ = aggregate([*honest_replies(), *twice])
    model = from_array_record(arrays)
    assert all(np.array_equal(model[name], honest_model[name]) for name in GLOBAL)
    assert strategy.report.num_replies == len(HONEST)
    assert "2 replies from one node" in strategy.report.rejected[101]


def _answer(message: Message, src: int) -> Message:
    """A reply to a pushed message (it has an id), sent by `src`."""
    metadata = Metadata(
        run_id=7,
        message_id=f"reply-{src}",
        src_node_id=src,
        dst_node_id=0,
        reply_to_message_id=message.metadata.message_id,
        group_id="1",
        created_at=0.0,
        ttl=3600.0,
        message_type=message.metadata.message_type,
    )
    content = RecordDict(
        {"arrays": to_array_record(delta(src)), "metrics": MetricRecord({WEIGHT_KEY: 10})}
    )
    return Message(content, metadata=metadata)


def test_pushed_round_accepts_only_answers_to_its_own_messages_from_their_nodes() -> None:
    strategy = FedgeAvg(min_train_nodes=1, min_available_nodes=1)
    messages = list(
        strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), NodeGrid(HONEST))
    )
    for i, message in enumerate(messages):  # what Grid.push_messages does
        message.metadata.__dict__["_message_id"] = f"train-{i}"
    to = {m.metadata.dst_node_id: m for m in messages}
    stale = instruction(3)  # answers a message of some other round
    replies = [_answer(to[1], 1), _answer(to[2], 3), Message(reply(3).content, reply_to=stale)]
    strategy.aggregate_train(1, replies)
    report = strategy.report
    assert report.num_replies == 1
    assert "sent by node 3" in report.rejected[2]
    assert "no training message of this round" in report.rejected[3]


# --- partial (head-only) updates: only where edge clients train the head ----------------


def _backbone(arrays: NamedArrays) -> bytes:
    return b"backbone"  # stands in for the ONNX export a run with edge clients sends


PARTIAL = {UPDATE_INFO_KEY: tag(CARRIES_PARTIAL)}


def test_a_partial_update_is_rejected_without_edge_clients(honest_model: NamedArrays) -> None:
    bad = reply(101, delta(101, HEAD), **PARTIAL)
    assert_rejected_alone(bad, honest_model, "no edge clients")


@pytest.mark.parametrize(
    ("names", "reason"),
    [({"head.weight"}, "exactly"), (set(GLOBAL), "exactly"), ({"features.0.bias"}, "exactly")],
)
def test_with_edge_clients_a_partial_update_must_be_exactly_the_head(
    names: set[str], reason: str
) -> None:
    strategy, _, _ = aggregate(
        [*honest_replies(), reply(101, delta(101, names), **PARTIAL)], edge_backbone=_backbone
    )
    assert reason in strategy.report.rejected[101]


def test_with_edge_clients_a_head_update_is_averaged_into_the_head_only() -> None:
    head = delta(101, HEAD)
    strategy, arrays, _ = aggregate(
        [reply(1), reply(101, head, **PARTIAL)], edge_backbone=_backbone
    )
    assert strategy.report.rejected == {}
    model = from_array_record(arrays)
    full, n_full, n_head = delta(1), weight_of(1), weight_of(101)
    for name in GLOBAL:
        mean = full[name]  # only the full update carries the backbone
        if name in HEAD:
            mean = (n_full * full[name] + n_head * head[name]) / (n_full + n_head)
        expected = (GLOBAL[name].astype(np.float64) + mean).astype(np.float32)
        np.testing.assert_allclose(model[name], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "info",
    [
        {"partial-update": True},  # the flag before replies were tagged
        {**tag(CARRIES_PARTIAL), "more": 1},
        {k: v for k, v in tag().items() if k != "model-digest"},
        {},
    ],
)
def test_update_info_that_is_not_a_whole_tag_is_rejected(
    info: dict[str, Any], honest_model: NamedArrays
) -> None:
    bad = reply(101, **{UPDATE_INFO_KEY: ConfigRecord(info)})
    assert_rejected_alone(bad, honest_model, UPDATE_INFO_KEY)


# --- metrics in range -------------------------------------------------------------------

BAD_METRICS: dict[str, tuple[str, object]] = {
    "dp-unclipped -3": (UNCLIPPED_KEY, -3),
    "dp-unclipped 2": (UNCLIPPED_KEY, 2),
    "dp-unclipped 0.5": (UNCLIPPED_KEY, 0.5),
    "dp-unclipped list": (UNCLIPPED_KEY, [1, 1]),
    "declined 2": (DECLINED_KEY, 2),
    "declined -1": (DECLINED_KEY, -1),
    "local-epsilon negative": (LOCAL_EPSILON_KEY, -0.1),
    "local-epsilon nan": (LOCAL_EPSILON_KEY, math.nan),
    "local-epsilon inf": (LOCAL_EPSILON_KEY, math.inf),
    "local-epsilon 10^400": (LOCAL_EPSILON_KEY, 10**400),
    "train-loss nan": (LOSS_KEY, math.nan),
    "train-loss -inf": (LOSS_KEY, -math.inf),
    "train-loss list": (LOSS_KEY, [0.5]),
}


@pytest.mark.parametrize("kind", sorted(BAD_METRICS))
def test_metric_out_of_range_is_rejected(kind: str, honest_model: NamedArrays) -> None:
    key, value = BAD_METRICS[kind]
    bad = reply(101, metrics={WEIGHT_KEY: 10, LOSS_KEY: 0.5, key: value})
    strategy = assert_rejected_alone(bad, honest_model, key)
    assert strategy.report.client_epsilons == []


@pytest.mark.parametrize("value", [True, "1", None, b"\x01"])
def test_metric_of_a_foreign_type_is_rejected(value: object, honest_model: NamedArrays) -> None:
    bad = reply(101, metrics=forced_metrics(**{UNCLIPPED_KEY: value}))
    assert_rejected_alone(bad, honest_model, UNCLIPPED_KEY)


def test_unknown_metrics_of_clashing_types_are_ignored_not_aggregated() -> None:
    replies = [
        reply(1, metrics={WEIGHT_KEY: 10, LOSS_KEY: 0.5, "extra": [1.0, 2.0]}),
        reply(2, metrics={WEIGHT_KEY: 30, LOSS_KEY: 1.5, "extra": 3.0}),
    ]
    strategy, arrays, metrics = aggregate(replies)
    assert arrays is not None and strategy.report.rejected == {}
    assert dict(metrics) == {LOSS_KEY: pytest.approx(1.25)}


def test_declined_reply_is_counted_and_one_with_an_update_rejected() -> None:
    declined = {WEIGHT_KEY: 10, DECLINED_KEY: 1, LOCAL_EPSILON_KEY: 2.5}
    quiet = Message(
        RecordDict({"metrics": MetricRecord(declined)}),  # type: ignore[arg-type]
        reply_to=instruction(101),
    )
    strategy, _, _ = aggregate([*honest_replies(), quiet, reply(102, metrics=declined)])
    report = strategy.report
    assert (report.num_replies, report.num_declined) == (3, 1)
    assert report.client_epsilons == [2.5]
    assert "declined reply must carry no update" in report.rejected[102]


# --- SecAgg's masked vector -------------------------------------------------------------

LENGTH = 12


def masked_content(array: Array | None, config: dict[str, Any] | None = None) -> RecordDict:
    content = RecordDict(
        {SECAGG_PAYLOAD_KEY: ConfigRecord({"stage": "x"} if config is None else config)}
    )
    if array is not None:
        content[MASKED_KEY] = ArrayRecord({MASKED_KEY: array})
    return content


def test_masked_vector_is_decoded_only_when_due_and_well_formed() -> None:
    vector = np.arange(LENGTH, dtype=np.uint32)
    payload = records_to_payload(masked_content(Array(vector)), LENGTH)
    np.testing.assert_array_equal(payload[MASKED_KEY], vector)
    assert payload["stage"] == "x"
    assert MASKED_KEY not in records_to_payload(masked_content(Array(vector)))  # none due
    for hostile, reason in [
        (Array(vector.astype(np.int64)), "uint32"),
        (Array(vector[:-1]), "shape"),
        (Array("uint32", (LENGTH,), "numpy.ndarray", b"garbage"), "npy header"),
        (Array("uint32", (LENGTH,), "numpy.ndarray", npy("<u4", False, HUGE)), "npy shape"),
    ]:
        got = records_to_payload(masked_content(hostile), LENGTH)[MASKED_KEY]
        assert isinstance(got, str) and reason in got


def test_masked_vector_that_is_not_npy_drops_only_its_sender_in_a_secagg_round() -> None:
    """Through the real protocol (fedge's ClientApp handlers over Flower's wire format)."""
    from test_secagg_flower import (
        NODES as SECAGG_NODES,
    )
    from test_secagg_flower import (
        SecAggGrid,
        assert_within_quantization,
        secure_strategy,
        train_round,
    )

    def garble(answer: Message) -> Message:
        record = answer.content.array_records[MASKED_KEY]
        declared = record[MASKED_KEY]
        record[MASKED_KEY] = Array("uint32", declared.shape, declared.stype, b"not an npy file")
        return answer

    grid = SecAggGrid(SECAGG_NODES)
    attacker = SECAGG_NODES[-1]
    grid.tamper[attacker, "train.secagg_masked_input"] = garble
    strategy = secure_strategy()
    arrays, _ = train_round(strategy, grid)
    honest = [node for node in SECAGG_NODES if node != attacker]
    assert_within_quantization(arrays, honest, len(SECAGG_NODES))
    assert set(strategy.report.rejected) == {attacker}
    assert "npy header" in strategy.report.rejected[attacker]


# --- fuzzing: thousands of malformed replies among honest ones --------------------------

DTYPES = [
    "<f8",
    "<f2",
    ">f4",
    "<i4",
    "<u4",
    "|b1",
    "<c8",
    "|O",
    "|S4",
    "<U1",
    "|V4",
    [("a", "<f4")],
    [("a", "<f4"), ("b", "<i2")],
    "<f4",
]
HEADER_SHAPES = st.one_of(
    st.lists(st.integers(-2, 2**40), max_size=4).map(tuple),
    st.sampled_from([HUGE, (10**12, 10**12), (10,), (64, 128), (10, 64), (), (-1,)]),
)


@st.composite
def hostile_array(draw: st.DrawFn, name: str) -> Array:
    """An Array for `name` that must not pass: every branch breaks at least one check."""
    reference = GLOBAL[name]
    kind = draw(st.sampled_from(["stype", "dtype", "shape", "bytes", "header", "nonfinite"]))
    if kind == "stype":
        stype = draw(st.text(max_size=20).filter(lambda s: s != "numpy.ndarray"))
        return Array(str(reference.dtype), reference.shape, stype, saved(reference))
    if kind == "dtype":
        dtype = np.dtype(draw(st.sampled_from(DTYPES[:-2])))
        if dtype.hasobject:
            return claimed(saved(np.zeros(reference.shape, object), allow_pickle=True), name)
        value = np.zeros(reference.shape, dtype)
        declared = draw(st.booleans())  # declare it honestly, or claim float32
        return Array(value) if declared else claimed(saved(value), name)
    if kind == "shape":
        shape = draw(st.lists(st.integers(0, 70), max_size=3).map(tuple))
        if shape == reference.shape:
            shape = (*shape, 1)
        value = np.zeros(shape, np.float32)
        return Array(value) if draw(st.booleans()) else claimed(saved(value), name)
    if kind == "bytes":
        data = draw(st.binary(max_size=300))
        return claimed(data, name)
    if kind == "header":
        version = draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (0, 1)]))
        descr = draw(st.sampled_from(DTYPES))
        fortran = draw(st.sampled_from([False, True, 0, "no"]))
        shape = draw(HEADER_SHAPES)
        header = npy(descr, fortran, shape, version)
        exact = len(header) + reference.nbytes
        length = exact + draw(st.integers(-64, 64).filter(lambda d: d != 0))
        return claimed((header + bytes(max(length - len(header), 0)))[: max(length, 0)], name)
    value = reference.copy()  # well-formed, decoded, then refused for its values
    value.flat[draw(st.integers(0, value.size - 1))] = draw(
        st.sampled_from([math.nan, math.inf, -math.inf])
    )
    return claimed(saved(value), name)


BAD_METRIC_VALUES: dict[str, st.SearchStrategy[object]] = {
    WEIGHT_KEY: st.one_of(
        st.integers(max_value=0),
        st.integers(min_value=CAP + 1, max_value=2**64),
        st.floats(),
        st.lists(st.integers(1, 10), max_size=3),
        st.sampled_from([True, "10", None, b"1"]),
    ),
    UNCLIPPED_KEY: st.one_of(
        st.integers().filter(lambda v: v not in (0, 1)),
        st.floats(),
        st.sampled_from([True, [0], "0"]),
    ),
    DECLINED_KEY: st.one_of(
        st.integers().filter(lambda v: v not in (0, 1)), st.floats(), st.just([1])
    ),
    LOCAL_EPSILON_KEY: st.one_of(
        st.floats(max_value=-1e-9),
        st.sampled_from([math.nan, math.inf, 10**400, -(10**400), [1.0], "1"]),
    ),
    LOSS_KEY: st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf, 10**400, [0.5], "0.5", None]),
    ),
}


@st.composite
def malformed_reply(draw: st.DrawFn, node: int) -> Message:
    """A reply from `node` that the gate must reject, whatever branch is drawn."""
    kind = draw(st.sampled_from(["array", "layout", "metrics", "error"]))
    if kind == "array":
        name = draw(st.sampled_from(NAMES))
        return reply(node, with_array(name, draw(hostile_array(name))))
    if kind == "metrics":
        key = draw(st.sampled_from(sorted(BAD_METRIC_VALUES)))
        metrics = forced_metrics(**{LOSS_KEY: 0.5, key: draw(BAD_METRIC_VALUES[key])})
        return reply(node, metrics=metrics)
    if kind == "error":
        return Message(Error(code=0, reason=draw(st.text(max_size=50))), reply_to=instruction(node))
    layout = draw(
        st.sampled_from(
            [
                "no arrays",
                "two arrays",
                "no metrics",
                "two metrics",
                "config",
                "partial",
                "unknown name",
                "missing name",
                "renamed",
            ]
        )
    )
    honest = reply(node)
    content = honest.content
    if layout == "no arrays":
        del content["arrays"]
    elif layout == "two arrays":
        content["more"] = to_array_record(delta(node))
    elif layout == "no metrics":
        del content["metrics"]
    elif layout == "two metrics":
        content["more"] = MetricRecord({WEIGHT_KEY: 10})
    elif layout == "config":
        content[draw(st.text(max_size=10))] = ConfigRecord({"x": draw(st.integers())})
    elif layout == "partial":
        content["arrays"] = to_array_record(delta(node, draw(st.sampled_from([HEAD, NAMES]))))
        content[UPDATE_INFO_KEY] = tag(CARRIES_PARTIAL)
    elif layout == "unknown name":
        extra = draw(st.text(max_size=30).filter(lambda s: s not in GLOBAL))
        content["arrays"][extra] = Array(np.zeros(draw(st.integers(0, 9)), np.float32))
    elif layout == "missing name":
        del content["arrays"][draw(st.sampled_from(NAMES))]
    else:
        record = content["arrays"]
        old = draw(st.sampled_from(NAMES))
        new = draw(st.text(max_size=30).filter(lambda s: s not in GLOBAL))
        record[new] = record[old]
        del record[old]
    return honest


@st.composite
def mixed_round(draw: st.DrawFn) -> tuple[list[Message], list[Message], set[int]]:
    """(honest replies, all replies shuffled, the nodes whose replies must be dropped).

    The honest replies come in their order among all, so both sums add in one order.
    """
    honest_nodes = draw(st.lists(st.sampled_from(HONEST), min_size=1, max_size=3, unique=True))
    honest = [reply(node) for node in sorted(honest_nodes)]
    nodes = draw(st.lists(st.sampled_from(MALICIOUS), min_size=5, max_size=10, unique=True))
    bad: list[Message] = []
    for node in nodes:
        how = draw(st.sampled_from(["malformed"] * 6 + ["twice", "valid twice"]))
        if how == "malformed":
            bad.append(draw(malformed_reply(node)))
        elif how == "twice":  # one good and one bad reply: neither may count
            bad += [reply(node), draw(malformed_reply(node))]
        else:
            bad += [reply(node), reply(node, delta(node + 1))]
    outsider = draw(st.sampled_from((None, *UNSAMPLED)))
    if outsider is not None:
        bad.append(reply(outsider))
    everything = draw(st.permutations(honest + bad))
    dropped = {message.metadata.src_node_id for message in bad}
    in_order = [message for message in everything if any(message is h for h in honest)]
    return in_order, everything, dropped


def _run(replies: list[Message]) -> tuple[FedgeAvg, NamedArrays, dict[str, Any], int]:
    strategy = FedgeAvg(min_train_nodes=1, min_available_nodes=1)
    start_round(strategy)
    result: list[Any] = []
    peak = _peak_during(lambda: result.extend(strategy.aggregate_train(1, replies)))
    arrays, metrics = result
    return strategy, from_array_record(arrays), dict(metrics), peak


BOOKKEEPING = 64 * 1024


class FormatOnly(logging.Handler):
    """Formats each record (its cost is measured) and keeps nothing: a capture buffer
    that grows over thousands of examples would show up in every peak."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


@pytest.fixture
def logs_formatted_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("flwr")
    monkeypatch.setattr(logger, "handlers", [FormatOnly()])
    monkeypatch.setattr(logger, "propagate", False)


@pytest.mark.usefixtures("logs_formatted_not_kept")
def test_fuzz_malformed_replies_never_escape_or_change_the_honest_aggregate() -> None:
    seen = {"malformed": 0, "extra peak": 0}

    @settings(
        max_examples=650,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mixed_round())
    def one_round(case: tuple[list[Message], list[Message], set[int]]) -> None:
        honest, everything, dropped = case
        _, want, want_metrics, honest_peak = _run(honest)
        strategy, got, metrics, peak = _run(everything)
        assert all(np.array_equal(got[name], want[name]) for name in GLOBAL)
        assert metrics == want_metrics
        assert set(strategy.report.rejected) == dropped
        assert strategy.report.num_replies == len(honest)
        # A rejected reply costs at most one decoded copy of the model (for the finite
        # check) and its temporaries, plus Python bookkeeping (reasons, log lines).
        assert peak <= honest_peak + 2 * MODEL_BYTES + BOOKKEEPING, (peak, honest_peak)
        seen["malformed"] += len(everything) - len(honest)
        seen["extra peak"] = max(seen["extra peak"], peak - honest_peak)

    one_round()
    print(f"fuzz: {seen}, model {MODEL_BYTES} bytes")
    assert seen["malformed"] >= 5000, seen


@st.composite
def masked_array(draw: st.DrawFn) -> tuple[Array, bool]:
    """(an Array for the masked vector, whether it is well-formed)."""
    kind = draw(st.sampled_from(["valid", "dtype", "length", "bytes", "header", "stype"]))
    if kind == "valid":
        levels = draw(st.lists(st.integers(0, 2**32 - 1), min_size=LENGTH, max_size=LENGTH))
        return Array(np.array(levels, dtype=np.uint32)), True
    if kind == "dtype":
        dtype = draw(st.sampled_from(DTYPES[:-2]).filter(lambda d: d not in ("|O", "<u4")))
        value = np.zeros(LENGTH, np.dtype(dtype))
        if draw(st.booleans()):  # declared honestly, or claimed to be uint32
            return Array(value), False
        return Array("uint32", (LENGTH,), "numpy.ndarray", saved(value)), False
    if kind == "length":
        size = draw(st.integers(0, 40).filter(lambda n: n != LENGTH))
        return Array(np.zeros(size, np.uint32)), False
    if kind == "bytes":
        return Array("uint32", (LENGTH,), "numpy.ndarray", draw(st.binary(max_size=200))), False
    if kind == "stype":
        stype = draw(st.text(max_size=10).filter(lambda s: s != "numpy.ndarray"))
        return Array("uint32", (LENGTH,), stype, saved(np.zeros(LENGTH, np.uint32))), False
    header = npy(draw(st.sampled_from(DTYPES)), draw(st.booleans()), draw(HEADER_SHAPES))
    data = header + bytes(max(4 * LENGTH + draw(st.integers(-8, 8).filter(bool)), 0))
    return Array("uint32", (LENGTH,), "numpy.ndarray", data), False


@pytest.mark.usefixtures("logs_formatted_not_kept")
@settings(
    max_examples=800,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    case=masked_array(),
    config=st.dictionaries(
        st.text(max_size=8), st.one_of(st.integers(0, 2**63 - 1), st.binary(max_size=8)), max_size=4
    ),
)
def test_fuzz_masked_vector_is_decoded_only_when_well_formed(
    case: tuple[Array, bool], config: dict[str, Any]
) -> None:
    array, valid = case
    content = masked_content(array, config)
    result: list[Mapping[str, object]] = []
    assert _peak_during(lambda: result.append(records_to_payload(content, LENGTH))) < 64_000
    payload = result[0]
    assert {k: v for k, v in payload.items() if k != MASKED_KEY} == {
        k: v for k, v in config.items() if k != MASKED_KEY
    }
    got = payload[MASKED_KEY]
    if valid:
        assert isinstance(got, np.ndarray) and got.dtype == np.uint32 and got.shape == (LENGTH,)
    else:
        assert isinstance(got, str)
