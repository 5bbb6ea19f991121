"""One fedge ServerApp run in its own process, so a test can kill it for real.

    python tests/budget_process.py '<run config as JSON>'

The nodes are fedge's ClientApp in this thread (test_simulation.LocalGrid: no Ray,
seconds per round). Exit status 0 when the run ends, 1 with the message on
stderr when fedge refuses it (ConfigError).
"""

from __future__ import annotations

import json
import sys

from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_simulation import LocalGrid

from fedge.config import ConfigError, FedgeConfig
from fedge.server_app.app import main as server_main

NODES = 3


def run(run_config: dict[str, object]) -> None:
    # Instruction messages carry the ServerApp task's identity; Flower sets it at runtime.
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    config = FedgeConfig.from_run_config(run_config).to_run_config()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_main(LocalGrid(config, NODES), context)


if __name__ == "__main__":
    try:
        run(json.loads(sys.argv[1]))
    except ConfigError as refusal:
        print(f"refused: {refusal}", file=sys.stderr)
        sys.exit(1)
