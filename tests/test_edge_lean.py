"""The lean edge install: the edge ClientApp path runs without the training/data stack.

`fedge[edge]` installs Flower, numpy, onnxruntime, cryptography and pillow, nothing
else. The subprocess tests make torch, scikit-learn, scipy, pandas, pyarrow, datasets,
flwr-datasets, matplotlib and onnx unimportable (a meta-path blocker installed by a
sitecustomize.py on PYTHONPATH, so it runs before anything else) and drive fedge's
ClientApp through an edge train and evaluate message on a node's own .npz file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.app.metadata import Metadata
from sklearn.datasets import load_digits

from fedge.client_app.protocol import (
    CARRIES_KEY,
    CARRIES_PARTIAL,
    EDGE_NODE_KEY,
    LOCAL_DATA_KEY,
    REPLY_KEY,
    TAG_ROUND_KEY,
    WEIGHT_KEY,
)
from fedge.config import FedgeConfig
from fedge.edge import client as edge_client
from fedge.edge.broadcast import BACKBONE_KEY, backbone_payload
from fedge.edge.head import HEAD_BIAS, HEAD_WEIGHT
from fedge.models import ModelSpec, build_model, state_to_numpy
from fedge.records import NamedArrays, to_array_record

REPO = Path(__file__).resolve().parents[1]
SPEC = ModelSpec("cnn", (1, 8, 8), 10)  # digits
NOT_IN_EDGE = (
    "torch",
    "sklearn",
    "scipy",
    "pandas",
    "pyarrow",
    "datasets",
    "flwr_datasets",
    "matplotlib",
    "onnx",
)
TRAIN_ONLY = {  # distributions the edge install must not pull in
    "torch",
    "scikit-learn",
    "scipy",
    "pandas",
    "pyarrow",
    "matplotlib",
    "flwr-datasets",
    "datasets",
    "opacus",
    "onnx",
}

BLOCKER = f"""
import importlib.abc, sys

class NotInTheEdgeInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {NOT_IN_EDGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in fedge[edge])", name=name)
        return None

sys.meta_path.insert(0, NotInTheEdgeInstall())
"""

NODE_SCRIPT = """
import json, pickle, sys
import numpy as np
from fedge.client_app import app  # the ClientApp an edge SuperNode loads

with open(sys.argv[1], "rb") as f:
    train_msg, evaluate_msg, context = pickle.load(f)
try:
    reply = app(train_msg, context)
    evaluated = app(evaluate_msg, context)
except Exception as error:  # Flower's runtime would send this back as the error reply
    print(json.dumps({"error": str(error)}))
    sys.exit(0)
update = reply.content.array_records["arrays"]
print(json.dumps({
    "arrays": sorted(update),
    "update_norm": float(np.sqrt(sum(np.sum(a.numpy() ** 2) for a in update.values()))),
    "info": dict(reply.content.config_records["update-info"]),
    "metrics": dict(reply.content.metric_records["metrics"]),
    "eval": dict(evaluated.content.metric_records["metrics"]),
}))
"""


def _global_arrays() -> NamedArrays:
    torch.manual_seed(0)
    return state_to_numpy(build_model(SPEC))


def _message(arrays: NamedArrays, kind: str) -> Message:
    """A server message as FedgeAvg sends it to an edge node (backbone included)."""
    config = {REPLY_KEY: "update", "server-round": 1, BACKBONE_KEY: backbone_payload(SPEC, arrays)}
    content = RecordDict({"arrays": to_array_record(arrays), "config": ConfigRecord(config)})
    metadata = Metadata(
        run_id=0,
        message_id=f"{kind}-1",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def _context(node_config: dict) -> Context:
    return Context(
        run_id=0,
        node_id=7,
        node_config={EDGE_NODE_KEY: True, **node_config},
        state=RecordDict(),
        run_config=FedgeConfig().to_run_config(),
    )


def _own_npz(path: Path, labels_offset: int = 0) -> Path:
    """200 real digits, as a device would store them: model-ready x and class indices y."""
    raw = load_digits()
    x = (raw.data[:200] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    np.savez(path, x=x, y=raw.target[:200].astype(np.int64) + labels_offset)
    return path


def _run_lean(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter where the training/data stack cannot be imported."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(blocker), str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )


def _node_run(tmp_path: Path, node_config: dict) -> dict:
    arrays = _global_arrays()
    messages = (_message(arrays, MessageType.TRAIN), _message(arrays, MessageType.EVALUATE))
    with open(tmp_path / "messages.pkl", "wb") as f:
        pickle.dump((*messages, _context(node_config)), f)
    done = _run_lean(tmp_path, NODE_SCRIPT, str(tmp_path / "messages.pkl"))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_edge_node_trains_and_evaluates_on_its_own_data_without_the_training_stack(
    tmp_path: Path,
) -> None:
    result = _node_run(tmp_path, {LOCAL_DATA_KEY: str(_own_npz(tmp_path / "mine.npz"))})
    assert "error" not in result, result
    assert result["arrays"] == [HEAD_BIAS, HEAD_WEIGHT]
    assert result["update_norm"] > 0  # the head learned something
    assert result["info"][CARRIES_KEY] == CARRIES_PARTIAL and result["info"][TAG_ROUND_KEY] == 1
    assert result["metrics"][WEIGHT_KEY] == 180  # 200 rows less val-fraction 0.1
    assert result["eval"][WEIGHT_KEY] == 20
    assert 0.0 <= result["eval"]["val-accuracy"] <= 1.0


def test_edge_node_on_the_shared_dataset_names_the_data_extra(tmp_path: Path) -> None:
    """Partitioning the run's shared (built-in) dataset needs scikit-learn / flwr-datasets."""
    result = _node_run(tmp_path, {"partition-id": 0, "num-partitions": 2})
    assert 'pip install "fedge[data]"' in result["error"]
    assert LOCAL_DATA_KEY in result["error"]  # ... or the node's own data


def test_the_blocker_makes_the_training_stack_unimportable(tmp_path: Path) -> None:
    script = "\n".join(
        f"try:\n    import {name}\n    print('imported {name}')\nexcept ImportError:\n    pass"
        for name in NOT_IN_EDGE
    )
    done = _run_lean(tmp_path, script + "\nimport numpy, onnxruntime, flwr, cryptography\n")
    assert done.returncode == 0, done.stderr
    assert "imported" not in done.stdout


def test_own_data_labels_must_be_class_indices(tmp_path: Path) -> None:
    """A node cannot map class names: its labels must index the global head's classes."""
    arrays = _global_arrays()
    context = _context({LOCAL_DATA_KEY: str(_own_npz(tmp_path / "shifted.npz", 1))})
    with pytest.raises(ValueError, match=re.escape("class indices 0..9")):
        edge_client.train(_message(arrays, MessageType.TRAIN), context, FedgeConfig())


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", line, maxsplit=1)[0].lower() for line in requirements}


def test_edge_extra_leaves_the_training_stack_out_and_dev_keeps_everything() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    edge_install = _names(project["dependencies"]) | _names(extras["edge"])
    assert not edge_install & TRAIN_ONLY, edge_install & TRAIN_ONLY
    assert {"flwr", "numpy", "onnxruntime", "cryptography"} <= edge_install
    assert TRAIN_ONLY - {"pandas", "pyarrow", "datasets"} <= (
        _names(extras["train"]) | _names(extras["data"])
    )
    assert "fedge[data]" in extras["train"]
    assert any(
        req.startswith("fedge[") and "train" in req and "edge" in req for req in extras["dev"]
    )
