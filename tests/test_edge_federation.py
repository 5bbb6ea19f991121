"""Edge clients in a federation: backbone broadcast, head-only updates, mixed aggregation."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common import MessageType
from flwr.supercore.task_identity import TaskIdentity

from fedge.client_app.local_data import local_data
from fedge.client_app.protocol import (
    CARRIES_KEY,
    CARRIES_PARTIAL,
    REPLY_KEY,
    UPDATE_INFO_KEY,
    model_digest,
    update_tag,
)
from fedge.config import FedgeConfig
from fedge.edge import client as edge_client
from fedge.edge.broadcast import BACKBONE_KEY, backbone_payload
from fedge.edge.head import HEAD_BIAS, HEAD_WEIGHT, HeadLearner, extract_features
from fedge.edge.runtime import EdgeModel
from fedge.models import ModelSpec, build_model, state_to_numpy
from fedge.records import NamedArrays, from_array_record, to_array_record
from fedge.server_app.strategy import FedgeAvg
from fedge.server_app.validation import WEIGHT_KEY, rejection_reason
from fedge.simulation import NodeGrid, run_inprocess

REPO = Path(__file__).resolve().parents[1]
SPEC = ModelSpec("cnn", (1, 8, 8), 10)  # digits
EDGE_PARTITION = 9

# Path search that skips torch and onnx, as on a device where they are not installed: imports
# fail and importlib.util.find_spec reports them missing. (test_edge_torchfree's
# `sys.modules[name] = None` trips scikit-learn, whose scipy calls getattr on any "torch"
# entry in sys.modules, which no real device has.)
DEVICE_SCRIPT = """
import importlib.machinery, json, pickle, sys

class NotInstalled(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "onnx"):
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [
    NotInstalled if finder is importlib.machinery.PathFinder else finder
    for finder in sys.meta_path
]

import fedge.client_app.app  # the ClientApp an edge SuperNode loads
from fedge.config import FedgeConfig
from fedge.edge import client

with open(sys.argv[1], "rb") as f:
    msg, context = pickle.load(f)
config = FedgeConfig.from_context(context)
reply = client.train(msg, context, config)
evaluated = client.evaluate(msg, context, config)
print(json.dumps({
    "torch_loaded": any(m.partition(".")[0] in ("torch", "onnx") for m in sys.modules),
    "arrays": sorted(reply.content.array_records["arrays"]),
    "info": dict(reply.content.config_records["update-info"]),
    "metrics": dict(reply.content.metric_records["metrics"]),
    "eval": dict(evaluated.content.metric_records["metrics"]),
}))
"""


def _global_arrays(seed: int = 0) -> NamedArrays:
    torch.manual_seed(seed)
    return state_to_numpy(build_model(SPEC))


def _context(config: FedgeConfig, partition: int = EDGE_PARTITION) -> Context:
    return Context(
        run_id=0,
        node_id=partition + 1,
        node_config={"partition-id": partition, "num-partitions": 10},
        state=RecordDict(),
        run_config=config.to_run_config(),
    )


def _instruction(
    arrays: NamedArrays,
    config: dict,
    kind: str = MessageType.TRAIN,
    node: int = EDGE_PARTITION + 1,
) -> Message:
    """A server message as FedgeAvg sends it, built without a running SuperLink."""
    content = RecordDict({"arrays": to_array_record(arrays), "config": ConfigRecord(config)})
    metadata = Metadata(
        run_id=0,
        message_id=f"{kind}-1",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def _edge_round(arrays: NamedArrays, **overrides: object) -> dict:
    """The train config FedgeAvg sends edge clients (with the patch wiring the backbone in)."""
    return {
        REPLY_KEY: "update",
        "server-round": 1,
        BACKBONE_KEY: backbone_payload(SPEC, arrays),
        **overrides,
    }


def test_edge_client_trains_without_torch(tmp_path: Path) -> None:
    arrays = _global_arrays()
    config = FedgeConfig()
    with open(tmp_path / "msg.pkl", "wb") as f:
        pickle.dump((_instruction(arrays, _edge_round(arrays)), _context(config)), f)
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", DEVICE_SCRIPT, str(tmp_path / "msg.pkl")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch_loaded"] is False
    assert result["arrays"] == [HEAD_BIAS, HEAD_WEIGHT]
    # a head-only update of round 1, for the model the server sent (digested without torch)
    assert result["info"] == {
        CARRIES_KEY: CARRIES_PARTIAL,
        "round": 1,
        "model-digest": model_digest(arrays),
    }
    assert result["metrics"][WEIGHT_KEY] > 0
    assert set(result["eval"]) == {"val-loss", "val-accuracy", WEIGHT_KEY}


def test_the_device_script_blocks_torch() -> None:
    script = DEVICE_SCRIPT.split("import fedge")[0] + "import fedge.edge.export\n"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0
    assert "No module named 'torch'" in done.stderr


def test_edge_update_changes_the_head_and_lowers_local_loss() -> None:
    arrays = _global_arrays()
    config = FedgeConfig()
    context = _context(config)
    msg = _instruction(arrays, _edge_round(arrays))
    reply = edge_client.train(msg, context, config)

    assert (
        rejection_reason(
            reply, arrays, server_round=1, partial_names=frozenset({HEAD_WEIGHT, HEAD_BIAS})
        )
        is None
    )
    update = from_array_record(reply.content.array_records["arrays"])
    assert sorted(update) == [HEAD_BIAS, HEAD_WEIGHT]
    for name, delta in update.items():
        assert delta.dtype == np.float32
        assert delta.shape == arrays[name].shape
        assert np.abs(delta).max() > 0
    data = local_data(config, context)
    assert reply.content.metric_records["metrics"][WEIGHT_KEY] == len(data.y_train)
    assert reply.content.config_records[UPDATE_INFO_KEY][CARRIES_KEY] == CARRIES_PARTIAL

    backbone = EdgeModel.from_bytes(msg.content.config_records["config"][BACKBONE_KEY])
    features = extract_features(backbone, data.x_train)
    before = HeadLearner.from_arrays(arrays).loss(features, data.y_train)
    after = HeadLearner.from_arrays({name: arrays[name] + update[name] for name in update})
    assert after.loss(features, data.y_train) < before


def test_edge_evaluate_reports_val_metrics() -> None:
    arrays = _global_arrays()
    config = FedgeConfig()
    context = _context(config)
    msg = _instruction(arrays, {BACKBONE_KEY: backbone_payload(SPEC, arrays)}, "evaluate")
    metrics = edge_client.evaluate(msg, context, config).content.metric_records["metrics"]
    assert metrics[WEIGHT_KEY] == len(local_data(config, context).y_val) > 0
    assert 0.0 <= metrics["val-accuracy"] <= 1.0
    assert metrics["val-loss"] > 0


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({REPLY_KEY: "weights"}, "only fedge's strategy"),  # a stock Flower strategy
        ({BACKBONE_KEY: None}, "sent no backbone"),
    ],
)
def test_edge_train_explains_what_it_needs(overrides: dict, error: str) -> None:
    arrays = _global_arrays()
    config = {k: v for k, v in _edge_round(arrays, **overrides).items() if v is not None}
    with pytest.raises(ValueError, match=error):
        edge_client.train(_instruction(arrays, config), _context(FedgeConfig()), FedgeConfig())


def test_backbone_payload_matches_torch_and_is_cached() -> None:
    arrays = _global_arrays()
    model = build_model(SPEC).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    x = np.random.default_rng(0).random((16, *SPEC.input_shape), dtype=np.float32)
    payload = backbone_payload(SPEC, arrays)
    with torch.no_grad():
        expected = model.features(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(EdgeModel.from_bytes(payload).forward(x), expected, atol=1e-5)

    # The head is not part of the backbone: a head-only change reuses the export.
    head_moved = {**arrays, HEAD_BIAS: arrays[HEAD_BIAS] + 1.0}
    start = time.perf_counter()
    assert backbone_payload(SPEC, head_moved) is payload
    assert time.perf_counter() - start < 0.05
    backbone_moved = {**arrays, "features.0.bias": arrays["features.0.bias"] + 1.0}
    assert backbone_payload(SPEC, backbone_moved) != payload


def test_int8_backbone_payload_is_smaller_and_close() -> None:
    arrays = _global_arrays()
    x = np.random.default_rng(1).random((64, *SPEC.input_shape), dtype=np.float32)
    fp32, int8 = backbone_payload(SPEC, arrays), backbone_payload(SPEC, arrays, True, x)
    assert len(int8) < len(fp32) / 2
    dense, quantized = (EdgeModel.from_bytes(p).forward(x) for p in (fp32, int8))
    assert np.corrcoef(dense.ravel(), quantized.ravel())[0, 1] > 0.99
    with pytest.raises(ValueError, match="calibration"):
        backbone_payload(SPEC, arrays, int8=True)


def test_strategy_moves_the_head_by_the_weighted_edge_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # configure_train builds messages
    arrays = _global_arrays()
    config = FedgeConfig()
    msg = _instruction(arrays, _edge_round(arrays))
    edge_reply = edge_client.train(msg, _context(config), config)
    edge_update = from_array_record(edge_reply.content.array_records["arrays"])
    n_edge = float(edge_reply.content.metric_records["metrics"][WEIGHT_KEY])
    # A torch client's full update that leaves the head alone but moves the backbone.
    n_torch = 100
    torch_update = {name: np.zeros_like(value) for name, value in arrays.items()}
    torch_update["features.0.bias"] += 0.5
    torch_reply = Message(
        content=RecordDict(
            {
                "arrays": to_array_record(torch_update),
                "metrics": MetricRecord({"train-loss": 1.0, WEIGHT_KEY: n_torch}),
                UPDATE_INFO_KEY: update_tag({"server-round": 1}, arrays),
            }
        ),
        reply_to=_instruction(arrays, {}, node=EDGE_PARTITION),
    )

    # A run with edge clients (it broadcasts a backbone), the two nodes sampled.
    strategy = FedgeAvg(min_train_nodes=1, min_available_nodes=1, edge_backbone=lambda a: b"")
    nodes = NodeGrid([EDGE_PARTITION, EDGE_PARTITION + 1])
    strategy.configure_train(1, to_array_record(arrays), ConfigRecord(), nodes)
    record, _ = strategy.aggregate_train(1, [torch_reply, edge_reply])
    assert strategy.report.num_rejected == 0
    assert isinstance(record, ArrayRecord)
    new = from_array_record(record)
    share = n_edge / (n_edge + n_torch)
    for name in (HEAD_WEIGHT, HEAD_BIAS):
        expected = arrays[name] + share * edge_update[name]
        np.testing.assert_allclose(new[name], expected, rtol=1e-6, atol=1e-7)
        assert not np.array_equal(new[name], arrays[name])
    # Only the torch client carries the backbone, so it moves by the full update.
    np.testing.assert_allclose(new["features.0.bias"], arrays["features.0.bias"] + 0.5, atol=1e-6)


def test_mixed_federation_accepts_edge_updates_and_learns(tmp_path: Path) -> None:
    run_inprocess(
        {
            "num-server-rounds": 3,
            "edge-clients": 3,
            "output-dir": str(tmp_path),
            "run-name": "mixed",
        },
        num_supernodes=10,
    )
    rows = [json.loads(line) for line in (tmp_path / "mixed" / "metrics.jsonl").open()]
    assert [row["round"] for row in rows] == [1, 2, 3]
    # 7 torch and 3 edge clients replied every round, and no reply was dropped.
    assert all(row["num_replies"] == 10 and row["num_rejected"] == 0 for row in rows)
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"]
