"""The edge runtime, head learner and edge commands work where torch and onnx are missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fedge.edge.export import export_onnx
from fedge.edge.head import HeadLearner
from fedge.models import ModelSpec, build_model

REPO = Path(__file__).resolve().parents[1]

# Setting a module to None in sys.modules makes any `import` of it raise ImportError.
DEVICE_SCRIPT = """
import json, sys
for blocked in ("torch", "onnx"):
    sys.modules[blocked] = None

import numpy as np
from fedge.edge import commands  # the device CLI must import without torch too
from fedge.edge.head import HeadLearner, extract_features
from fedge.edge.runtime import EdgeModel

out = sys.argv[1]
x = np.load(out + "/x.npy")
labels = np.arange(len(x)) % 10
predictions = EdgeModel(out + "/model.onnx").predict(x)
learner = HeadLearner.load(out + "/head.npz")
features = extract_features(EdgeModel(out + "/backbone.onnx"), x)
step = learner.train(features, labels, epochs=20, lr=0.5, batch_size=8)
print(json.dumps({"predictions": predictions.tolist(), **step}))
"""


def _python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )


def test_prediction_and_head_training_run_without_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", (1, 8, 8), 10)).eval()
    export_onnx(model, (1, 8, 8), tmp_path / "model.onnx")
    export_onnx(model.features, (1, 8, 8), tmp_path / "backbone.onnx", "features")
    HeadLearner(model.head.weight.detach().numpy(), model.head.bias.detach().numpy()).save(
        tmp_path / "head.npz"
    )
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).argmax(1).tolist()

    done = _python(DEVICE_SCRIPT, str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["predictions"] == expected
    assert result["loss_after"] < result["loss_before"]


def test_the_block_stops_modules_that_need_torch() -> None:
    script = DEVICE_SCRIPT.split("import numpy")[0] + "import fedge.edge.export\n"
    done = _python(script)
    assert done.returncode != 0
    assert "import of torch halted" in done.stderr
