"""Clipping and noise work on an edge client without torch, opacus or scipy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A None entry in sys.modules makes any import of that module raise ImportError.
EDGE_CLIENT = """
import sys
for blocked in ("torch", "opacus", "scipy"):
    sys.modules[blocked] = None

import numpy as np
from fedge.privacy.clipping import AdaptiveClipping, clip_update
from fedge.privacy.noise import add_distributed_noise

update = {"w": np.full(10, 3.0, np.float32)}
clipped, norm = clip_update(update, 1.0)
noised = add_distributed_noise(clipped, noise_multiplier=1.0, clip_norm=1.0, min_clients=5)
AdaptiveClipping(clip_norm=1.0, count_stddev=1.0).update(1, 2, expected_clients=2)
print(noised["w"].dtype, round(norm, 3))
"""


def test_clipping_and_noise_import_without_torch() -> None:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", EDGE_CLIENT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["float32", "9.487"]
