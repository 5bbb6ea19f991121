"""Compressed uploads without SecAgg (issue 14, item 1): `update-compression`.

Adversaries: a malicious client crafts the encoded arrays (wrong dtypes, shapes and
byte counts, NaN or huge scales, top-k indices out of range or repeated, a
different encoding than the run's) — each must be a rejection with a reason, never
an exception, and nothing may be decoded or allocated beyond the model's size before
it is checked. Under DP, the clip check measures the *decoded* update, so an honest
client must clip what it encodes. The encodings themselves must be unbiased (int8,
int4) or keep what they did not send (top-k's error feedback, in `context.state`,
which Flower carries from one ClientApp process to the next).
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.supercore.task_identity import TaskIdentity
from grids import instruction, node_contexts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.client_app import app as client_app
from fedge.client_app.privatize import RESIDUAL_KEY, encoded_upload
from fedge.client_app.protocol import (
    CARRIES_PARTIAL,
    CLIP_KEY,
    ENCODING_KEY,
    LOSS_KEY,
    UPDATE_INFO_KEY,
    WEIGHT_KEY,
    encoding_config,
    model_digest,
    update_tag,
)
from fedge.compression import (
    BLOCK,
    INDICES,
    LEVELS,
    QUANTIZED,
    SCALES,
    VALUES,
    Encoding,
    decode,
    encode,
    rotation_seed,
)
from fedge.config import ConfigError, FedgeConfig
from fedge.records import NamedArrays, flatten, to_array_record
from fedge.server_app.app import main as server_main
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.strategy import FedgeAvg
from fedge.server_app.validation import check_reply, masked_upload_reason
from fedge.simulation import NodeGrid

ROUND = 3
SHAPES = {"conv.weight": (16, 1, 3, 3), "conv.bias": (16,), "head.weight": (10, 70)}
GLOBAL: NamedArrays = {
    name: np.random.default_rng(1).normal(size=shape).astype(np.float32)
    for name, shape in SHAPES.items()
}
SIZE = sum(value.size for value in GLOBAL.values())  # 860: not a multiple of BLOCK
DIGEST = model_digest(GLOBAL)
SEED = rotation_seed(ROUND, DIGEST)
ENCODINGS = {
    "int8": Encoding("int8"),
    "int4": Encoding("int4"),
    "int8-rotated": Encoding("int8", rotation=True),
    "int4-rotated": Encoding("int4", rotation=True),
    "topk": Encoding("topk", topk_fraction=0.05),
}
QUANTIZERS = {name: e for name, e in ENCODINGS.items() if e.scheme in LEVELS}


@pytest.fixture(autouse=True, scope="module")
def serverapp_identity() -> Iterator[None]:
    """Messages carry the sending task's identity (set by Flower at runtime)."""
    with pytest.MonkeyPatch.context() as patch:
        for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            patch.setattr(TaskIdentity, attr, value)
        yield


def update(seed: int, scale: float = 0.01) -> NamedArrays:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(scale=scale, size=s).astype(np.float32) for n, s in SHAPES.items()}


def train_config(encoding: Encoding, clip: float | None = None) -> ConfigRecord:
    config = ConfigRecord({"server-round": ROUND, **encoding_config(encoding)})
    if clip is not None:
        config[CLIP_KEY] = clip
    return config


def honest_reply(
    encoding: Encoding, node: int = 5, seed: int = 0, clip: float | None = None
) -> Message:
    """A reply as fedge's torch ClientApp sends it under `encoding`."""
    arrays, scheme = encoded_upload(
        update(seed), train_config(encoding, clip), GLOBAL, RecordDict(), node
    )
    return reply_with(arrays, scheme)


def reply_with(
    arrays: ArrayRecord, scheme: object, carries: str = "update", node: int = 5
) -> Message:
    tag = update_tag({"server-round": ROUND}, GLOBAL, carries)
    if scheme != "none":
        tag[ENCODING_KEY] = scheme  # type: ignore[assignment]
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({WEIGHT_KEY: 10, LOSS_KEY: 0.5}),
            UPDATE_INFO_KEY: tag,
        }
    )
    return Message(content, reply_to=instruction(node))


def gate(message: Message, encoding: Encoding | None) -> tuple[NamedArrays | None, str | None]:
    checked, reason = check_reply(
        message,
        GLOBAL,
        server_round=ROUND,
        digest=DIGEST,
        encoding=encoding,
        partial_names=frozenset({"head.weight"}),
    )
    return (None if checked is None else checked.update), reason


def parts_of(encoding: Encoding, seed: int = 0) -> dict[str, np.ndarray]:
    vector = flatten(update(seed), list(GLOBAL))
    return encode(vector, encoding, rng=np.random.default_rng(seed), seed=SEED)


# --- the encodings ----------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZERS)
def test_stochastic_quantization_is_unbiased(name: str) -> None:
    encoding = QUANTIZERS[name]
    vector = flatten(update(0, scale=1.0), list(GLOBAL))
    draws = 400
    decoded = np.stack(
        [
            decode(
                encode(vector, encoding, rng=np.random.default_rng(i), seed=SEED),
                encoding,
                SIZE,
                SEED,
            )
            for i in range(draws)
        ]
    )
    step = np.abs(vector).max() / LEVELS[encoding.scheme]  # the grid spacing (no rotation)
    single = np.abs(decoded[0] - vector).mean()
    bias = np.abs(decoded.mean(axis=0) - vector)
    # One draw is off by about a grid step; the mean of 400 by ~1/20 of that at most,
    # where rounding to nearest would keep a bias of up to half a step on every value.
    assert single > 0.1 * step, (single, step)
    assert bias.max() < 6 * step / 2 / np.sqrt(draws), (bias.max(), step)
    assert bias.mean() < single / 10, (bias.mean(), single)


@pytest.mark.parametrize("name", ENCODINGS)
def test_decoded_norm_stays_within_the_clip_norm(name: str) -> None:
    encoding = ENCODINGS[name]
    clip = 0.2
    exceeded_without = 0
    for seed in range(20):
        vector = flatten(update(seed), list(GLOBAL))
        vector *= clip / np.linalg.norm(vector)  # already clipped, as privatize_update does
        rng = np.random.default_rng(seed)
        loose = decode(encode(vector, encoding, rng=rng, seed=SEED), encoding, SIZE, SEED)
        exceeded_without += np.linalg.norm(loose.astype(np.float32)) > clip * (1 + 1e-5)
        rng = np.random.default_rng(seed)
        sent = decode(encode(vector, encoding, rng=rng, seed=SEED, clip=clip), encoding, SIZE, SEED)
        assert np.linalg.norm(sent.astype(np.float32)) <= clip * (1 + 1e-5)
    if encoding.scheme in LEVELS:  # rounding alone lengthens some vectors past C
        assert exceeded_without > 0


def test_bytes_per_parameter_of_each_layout() -> None:
    size = 100 * BLOCK
    per_param = {
        name: sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in e.layout(size).values())
        / size
        for name, e in ENCODINGS.items()
    }
    assert per_param["int8"] == per_param["int8-rotated"] == 1 + 4 / BLOCK
    assert per_param["int4"] == per_param["int4-rotated"] == 0.5 + 4 / BLOCK
    assert per_param["topk"] == 0.05 * 8


def test_topk_error_feedback_keeps_and_later_sends_what_was_not_sent() -> None:
    encoding = Encoding("topk", topk_fraction=0.05)
    state = RecordDict()
    updates = [update(seed) for seed in range(6)]
    sent_total = np.zeros(SIZE)
    for round_ in range(1, len(updates) + 1):
        config = ConfigRecord({"server-round": round_, **encoding_config(encoding)})
        arrays, _ = encoded_upload(updates[round_ - 1], config, GLOBAL, state, node_id=5)
        index, values = arrays[INDICES].numpy(), arrays[VALUES].numpy()
        assert len(index) == encoding.kept(SIZE) == 43
        sent = np.zeros(SIZE)
        sent[index] = values
        residual = state.array_records[RESIDUAL_KEY][RESIDUAL_KEY].numpy()
        if round_ == 1:  # what round 1 did not send is exactly the rest of its update
            first = flatten(updates[0], list(GLOBAL))
            expected = first.copy()
            expected[index] = 0
            np.testing.assert_allclose(residual, expected, atol=1e-7)
            kept = np.sort(np.argsort(-np.abs(first))[: len(index)])
            np.testing.assert_array_equal(index, kept)
        sent_total += sent
        # Nothing is lost: sent so far + still held = every update so far.
        total = sum(flatten(u, list(GLOBAL)) for u in updates[:round_])
        np.testing.assert_allclose(sent_total + residual, total, atol=1e-6)
    assert np.linalg.norm(residual) > 0


def test_the_residual_crosses_from_one_clientapp_process_to_the_next() -> None:
    """The SuperNode hands each message's ClientApp process the context as a proto
    (`context_to_proto`) and stores what comes back; the residual must survive that."""
    encoding = Encoding("topk", topk_fraction=0.05)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    encoded_upload(update(0), train_config(encoding), GLOBAL, context.state, 5)
    restarted = context_from_proto(context_to_proto(context))
    before = context.state.array_records[RESIDUAL_KEY][RESIDUAL_KEY].numpy()
    after = restarted.state.array_records[RESIDUAL_KEY][RESIDUAL_KEY].numpy()
    np.testing.assert_array_equal(before, after)
    assert np.abs(after).sum() > 0
    fresh, carried = RecordDict(), restarted.state
    a, _ = encoded_upload(update(1), train_config(encoding), GLOBAL, carried, 5)
    b, _ = encoded_upload(update(1), train_config(encoding), GLOBAL, fresh, 5)
    assert not np.array_equal(a[VALUES].numpy(), b[VALUES].numpy())


# --- the server side: the reply gate ----------------------------------------------------


@pytest.mark.parametrize("name", ENCODINGS)
def test_an_honest_encoded_reply_decodes_to_what_the_client_encoded(name: str) -> None:
    encoding = ENCODINGS[name]
    message = honest_reply(encoding)
    decoded, reason = gate(message, encoding)
    assert reason is None and decoded is not None
    parts = {k: v.numpy() for k, v in message.content.array_records["arrays"].items()}
    expected = decode(parts, encoding, SIZE, SEED)
    np.testing.assert_allclose(flatten(decoded, list(GLOBAL)), expected, rtol=1e-6, atol=1e-9)
    assert {n: (v.dtype, v.shape) for n, v in decoded.items()} == {
        n: (v.dtype, v.shape) for n, v in GLOBAL.items()
    }
    if encoding.scheme in LEVELS:  # close to the update it encodes
        error = np.linalg.norm(expected - flatten(update(0), list(GLOBAL)))
        assert error < 0.25 * np.linalg.norm(expected)


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


def _crafted(encoding: Encoding, change: str) -> ArrayRecord:
    parts = parts_of(encoding)
    quantized = encoding.scheme in LEVELS
    if change == "wrong dtype":
        key = QUANTIZED if quantized else INDICES
        parts[key] = parts[key].astype(np.int64)
    elif change == "one value short":
        key = QUANTIZED if quantized else VALUES
        parts[key] = parts[key][:-1]
    elif change == "a million values":
        key = SCALES if quantized else VALUES
        parts[key] = np.ones(10**6, np.float32)
    elif change == "extra array":
        parts["extra"] = np.zeros(1, np.float32)
    elif change == "missing array":
        del parts[SCALES if quantized else INDICES]
    elif change == "nan":
        parts[SCALES if quantized else VALUES][0] = np.nan
    elif change == "inf":
        parts[SCALES if quantized else VALUES][-1] = np.inf
    elif change == "negative scale / index":
        key = SCALES if quantized else INDICES
        parts[key][0] = -1
    elif change == "huge scale / index past the end":
        if quantized:
            parts[SCALES][:] = np.finfo(np.float32).max
        else:
            parts[INDICES][-1] = SIZE
    elif change == "repeated / unsorted":
        if quantized:
            return _with_data(parts, QUANTIZED, b"\x00" * 10)
        parts[INDICES][1] = parts[INDICES][0]
    return to_array_record(parts)


def _with_data(parts: dict[str, np.ndarray], key: str, data: bytes) -> ArrayRecord:
    """A record whose `key` Array declares the right dtype and shape over other bytes."""
    record = to_array_record(parts)
    honest = record[key]
    record[key] = Array(honest.dtype, tuple(honest.shape), honest.stype, data)
    return record


CHANGES = (
    "wrong dtype",
    "one value short",
    "a million values",
    "extra array",
    "missing array",
    "nan",
    "inf",
    "negative scale / index",
    "huge scale / index past the end",
    "repeated / unsorted",
)


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("name", ["int8", "int4-rotated", "topk"])
def test_a_crafted_encoding_is_refused_before_it_is_decoded(
    name: str, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoding = ENCODINGS[name]
    message = reply_with(_crafted(encoding, change), encoding.scheme)
    decoded: list[object] = []
    import fedge.server_app.validation as validation

    real = validation.decode
    monkeypatch.setattr(
        validation,
        "decode",
        lambda *a: decoded.append(1) or real(*a),  # type: ignore[func-returns-value]
    )
    update_, reason = gate(message, encoding)
    assert update_ is None and reason, reason
    # A crafted scale decodes (to Inf, refused after); nothing else reaches the decoder.
    assert not decoded or (
        change in ("huge scale / index past the end",) and encoding.scheme in LEVELS
    )


def test_a_reply_in_another_encoding_than_the_runs_is_refused() -> None:
    int8, int4 = Encoding("int8"), Encoding("int4")
    refused = {
        "int4 sent, int8 expected": (
            reply_with(honest_reply(int4).content.array_records["arrays"], "int4"),
            int8,
        ),
        "float32 sent, int8 expected": (reply_with(to_array_record(update(0)), "none"), int8),
        "int8 sent, float32 expected": (honest_reply(int8), None),
        "unknown name": (reply_with(to_array_record(update(0)), "int3"), None),
        "not a string": (reply_with(to_array_record(update(0)), 8), int8),
    }
    for case, (message, expected) in refused.items():
        decoded, reason = gate(message, expected)
        assert decoded is None and reason and "update-compression" in reason, (case, reason)


def test_a_partial_update_must_be_float32_and_a_masked_upload_names_no_encoding() -> None:
    head = {"head.weight": update(0)["head.weight"]}
    encoding = Encoding("int8")
    assert gate(reply_with(to_array_record(head), "none", CARRIES_PARTIAL), encoding)[1] is None
    parts = encode(head["head.weight"].ravel(), encoding, rng=np.random.default_rng(0), seed=1)
    _, reason = gate(reply_with(to_array_record(parts), "int8", CARRIES_PARTIAL), encoding)
    assert reason and "update-compression" in reason
    masked = reply_with(ArrayRecord(), "int8")
    assert "SecAgg+" in (masked_upload_reason(masked.content, ROUND, DIGEST) or "")
    plain = reply_with(ArrayRecord(), "none")
    assert masked_upload_reason(plain.content, ROUND, DIGEST) is None


@st.composite
def fuzzed_parts(draw: st.DrawFn) -> tuple[Encoding, ArrayRecord, object]:
    """An honest encoding with one part's bytes, dtype or shape replaced, or its tag's name."""
    encoding = draw(st.sampled_from(list(ENCODINGS.values())))
    parts = parts_of(encoding, draw(st.integers(0, 3)))
    record = to_array_record(parts)
    key = draw(st.sampled_from(sorted(parts)))
    honest = record[key]
    dtype = draw(st.sampled_from([honest.dtype, "float32", "int8", "uint8", "int32", "float64"]))
    shape = draw(st.sampled_from([tuple(honest.shape), (len(parts[key]) + 1,), (0,), (2**40,)]))
    data = draw(
        st.one_of(
            st.just(honest.data),
            st.binary(max_size=200),
            st.binary(min_size=1, max_size=64).map(lambda b: honest.data[:128] + b * 500),
        )
    )
    record[key] = Array(dtype, shape, honest.stype, data)
    scheme = draw(st.sampled_from([encoding.scheme, "none", "int4", "topk"]))
    return encoding, record, scheme


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzzed_parts())
def test_fuzz_the_gate_refuses_or_decodes_within_the_models_size(
    case: tuple[Encoding, ArrayRecord, object],
) -> None:
    encoding, record, scheme = case
    message = reply_with(record, scheme)
    tracemalloc.start()
    try:
        decoded, reason = gate(message, encoding)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * SIZE * 8  # a handful of float64 copies of the model, never 2**40
    if decoded is None:
        assert isinstance(reason, str) and reason
    else:
        assert reason is None
        assert all(np.isfinite(v).all() and v.shape == GLOBAL[n].shape for n, v in decoded.items())


# --- DP: the clip check measures the decoded update -------------------------------------


@pytest.mark.parametrize("name", ENCODINGS)
def test_the_dp_clip_check_sees_the_decoded_update(name: str) -> None:
    encoding = ENCODINGS[name]
    clip = 0.05
    privacy = ServerPrivacy(
        FedgeConfig.from_run_config({"dp-mode": "central", "dp-clipping-norm": clip})
    )
    strategy = FedgeAvg(privacy=privacy, compression=encoding)
    strategy.current_arrays, strategy.current_round, strategy.current_digest = (
        GLOBAL,
        ROUND,
        DIGEST,
    )
    # Honest: clipped before encoding, and what is encoded scaled to stay within C.
    from fedge.client_app.privatize import privatize_update

    clipped, _ = privatize_update(update(0, scale=0.1), train_config(encoding, clip))
    arrays, scheme = encoded_upload(clipped, train_config(encoding, clip), GLOBAL, RecordDict(), 5)
    checked, reason = strategy.checked_update(reply_with(arrays, scheme))
    assert reason is None and checked is not None
    # A client that encodes its unclipped update is dropped by the same check.
    arrays, scheme = encoded_upload(
        update(0, scale=0.1), train_config(encoding), GLOBAL, RecordDict(), 5
    )
    checked, reason = strategy.checked_update(reply_with(arrays, scheme))
    assert checked is None and reason and "exceeds the clip norm" in reason


# --- config ---------------------------------------------------------------------------


def test_compression_with_secagg_is_refused_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match="set update-compression='none' with secagg=true"):
        FedgeConfig.from_run_config({"update-compression": "int8", "secagg": True})
    with pytest.raises(ConfigError, match=r"update-rotation=true .* 'int8' or 'int4'"):
        FedgeConfig.from_run_config({"update-compression": "topk", "update-rotation": True})
    with pytest.raises(ConfigError, match="topk-fraction"):
        FedgeConfig.from_run_config({"update-compression": "topk", "topk-fraction": 0.0})


# --- whole runs -----------------------------------------------------------------------


class CountingGrid(NodeGrid):
    """Hands each message to fedge's ClientApp in this thread; counts the reply bytes."""

    def __init__(self, run_config: dict[str, Any], num_nodes: int) -> None:
        self.contexts = node_contexts(range(100, 100 + num_nodes), run_config)
        super().__init__(self.contexts)
        self.upload_bytes: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = [client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
        for answer in replies:
            for record in answer.content.array_records.values():
                self.upload_bytes.append(sum(len(a.data) for a in record.values()))
        return replies


def run(tmp_path: Path, name: str, **extra: Any) -> tuple[list[dict[str, Any]], CountingGrid]:
    config = FedgeConfig.from_run_config(
        {
            "num-server-rounds": 4,
            "local-epochs": 1,
            "fraction-evaluate": 0.0,
            "min-train-nodes": 2,
            "output-dir": str(tmp_path),
            "run-name": name,
            "seed": 3,
            **extra,
        }
    ).to_run_config()
    grid = CountingGrid(config, 4)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_main(grid, context)
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()], grid


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "largest_ratio"),
    [
        ({"update-compression": "int8"}, 0.27),
        ({"update-compression": "int4", "update-rotation": True}, 0.15),
        ({"update-compression": "topk", "topk-fraction": 0.05}, 0.11),
    ],
)
def test_a_compressed_run_learns_with_every_reply_accepted(
    tmp_path: Path, extra: dict[str, Any], largest_ratio: float
) -> None:
    rows, grid = run(tmp_path, extra["update-compression"], **extra)
    assert all(r["num_rejected"] == 0 and r["num_replies"] == 4 for r in rows), rows
    model_bytes = 4 * 38378  # the digits CNN in float32
    assert max(grid.upload_bytes) < largest_ratio * model_bytes, grid.upload_bytes
    assert rows[-1]["test_accuracy"] > max(0.5, rows[0]["test_accuracy"] + 0.2), rows
