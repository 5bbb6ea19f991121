"""The federation half of scripts/arm64-edge.sh: a real TLS deployment on 127.0.0.1 whose
edge SuperNode runs inside the arm64 root (under qemu), next to two x86 torch SuperNodes.

Run by arm64-edge.sh (as root, with the root mounted and fedge[edge] installed in it); the
environment names the root, its venv, the output folder and the checkout. Three runs:
`with-edge` (all three nodes), then with the arm64 node stopped `without-edge` and
`without-edge-again` (the control: how much two identical runs differ). The global head
changed because of the edge node if with/without differ by far more than the control.
Writes result.json in the output folder. Every process it started is stopped on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedge.deploy import LocalDeployment, NodeSpec
from fedge.edge.head import HEAD_BIAS, HEAD_WEIGHT

CHECKOUT = Path(os.environ["FEDGE_CHECKOUT"])
sys.path.insert(0, str(CHECKOUT / "tests"))  # deploy_helpers: `flwr run` as the tests drive it
ROOT = Path(os.environ["FEDGE_ARM64_ROOT"])
VENV = os.environ["FEDGE_ARM64_VENV"]
OUT = Path(os.environ["FEDGE_ARM64_OUT"])
ROUNDS = int(os.environ.get("FEDGE_ARM64_ROUNDS", "3"))
EDGE = 2  # the arm64 node's index and partition (of 3)
# digits as an .npz, at the same path on the host and in the root: every node reads it with
# numpy alone (a lean edge install has no scikit-learn for the built-in `digits`).
DATA = OUT / "data" / "digits.npz"
GUEST_RUN = "/opt/fedge-run"  # inside the root: the node's certificate, key and FLWR_HOME
RUN_TIMEOUT = 3600.0


class MixedDeployment(LocalDeployment):
    """`fedge deploy`'s federation, with SuperNode EDGE started inside the arm64 root."""

    def _supernode_argv(
        self, spec: NodeSpec, *, private_key: Path | None, root: Path | None = None
    ) -> list[str]:
        argv = super()._supernode_argv(spec, private_key=private_key, root=root)
        if spec.index != EDGE:
            return argv
        guest = {path: self._into_root(Path(path)) for path in argv if Path(path).is_file()}
        guest[argv[0]] = f"{VENV}/bin/flower-supernode"
        env = dict(self._process_env(Path(GUEST_RUN) / "home"))
        keep = ("FLWR_HOME", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK")
        keep += ("PYTHONUNBUFFERED", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL")
        pairs = [f"{k}={env[k]}" for k in keep] + [f"PATH={VENV}/bin:/usr/bin:/bin", "HOME=/root"]
        return ["chroot", str(ROOT), "/usr/bin/env", "-i", *pairs, *(guest.get(a, a) for a in argv)]

    @staticmethod
    def _into_root(path: Path) -> str:
        """Copy a certificate or key file into the root; its path as the node sees it."""
        target = ROOT / GUEST_RUN.lstrip("/") / "certs" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        return f"{GUEST_RUN}/certs/{path.name}"


class PeakMemory:
    """Polls /proc for processes whose root is the arm64 root: peak VmHWM per role and the
    peak of their summed VmRSS (the edge node as a whole). Under qemu-user these are the
    emulator's numbers, which include qemu's own memory and translated code."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_kb: dict[str, int] = {}
        self.peak_total_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            total = 0
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    if os.readlink(proc / "root") != str(ROOT):
                        continue
                    status = (proc / "status").read_text()
                    argv = (proc / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                rss, hwm = (int(fields.get(k, "0 kB").split()[0]) for k in ("VmRSS", "VmHWM"))
                total += rss
                role = next(
                    (r for r in ("flower-supernode", "flwr-clientapp") if r in argv), "other"
                )
                self.peak_kb[role] = max(self.peak_kb.get(role, 0), hwm)
            self.peak_total_kb = max(self.peak_total_kb, total)


def write_dataset() -> None:
    from fedge.data.sources import load_digits_pool

    x, y, _, _ = load_digits_pool()
    for path in (DATA, ROOT / str(DATA).lstrip("/")):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x, y=y)


def edge_local_data(federation: LocalDeployment) -> str:
    """Where fedge supports it (node config `local-data`, numpy only), the edge node gets its
    own partition as a file, so a lean install needs no scikit-learn to partition; else it
    partitions the shared dataset itself. Says which."""
    from fedge.client_app import protocol

    key = getattr(protocol, "LOCAL_DATA_KEY", None)
    if key is None:
        return f"shared dataset, partition {EDGE} of 3 (partitioned on the node)"
    from flwr.app import Context, RecordDict

    from fedge.client_app.local_data import local_data
    from fedge.config import FedgeConfig

    config = FedgeConfig.from_run_config(run_config("data", 3))
    spec = federation.nodes[EDGE]
    context = Context(0, EDGE + 1, dict(spec.node_config), RecordDict(), config.to_run_config())
    data = local_data(config, context)
    guest = f"{GUEST_RUN}/local-data.npz"
    x = np.concatenate([data.x_train, data.x_val])
    np.savez(ROOT / guest.lstrip("/"), x=x, y=np.concatenate([data.y_train, data.y_val]))
    spec.node_config[key] = guest
    return f"node's own {key} file: partition {EDGE} of 3 ({len(x)} rows) written on the host"


def run_config(name: str, nodes: int) -> dict[str, Any]:
    return {
        "dataset": str(DATA),
        "num-server-rounds": ROUNDS,
        "edge-backbone": "int8",
        "min-train-nodes": nodes,
        "min-available-nodes": nodes,
        "output-dir": str(OUT / "outputs"),
        "run-name": name,
    }


def run(federation: LocalDeployment, app: Path, name: str, nodes: int) -> dict[str, Any]:
    """One `flwr run`; its metrics rows and final global head."""
    from deploy_helpers import FlwrRun, read_rows  # these import torch (the x86 side)

    from fedge.server_app.run_folder import RunFolder

    started = time.monotonic()
    with FlwrRun(federation, app, run_config(name, nodes), OUT / f"flwr-run-{name}.log") as cli:
        code = cli.wait(RUN_TIMEOUT)
    folder = OUT / "outputs" / name
    rows = read_rows(folder / "metrics.jsonl")
    if code != 0 or len(rows) != ROUNDS:
        raise RuntimeError(f"run {name} failed ({code}, {len(rows)} rows); see {cli.log_path}")
    arrays = RunFolder(folder).load_checkpoint().arrays
    return {
        "wall_seconds": round(time.monotonic() - started, 1),
        "rows": rows,
        "head": {name: arrays[name] for name in (HEAD_WEIGHT, HEAD_BIAS)},
    }


def head_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(max(np.abs(a[name] - b[name]).max() for name in a))


def install_summary() -> dict[str, Any]:
    """What arm64-edge.sh measured before the federation (install.json)."""
    install = json.loads((OUT / "install.json").read_text())
    imports = install["import_seconds"]
    return {
        "emulation": "qemu-user aarch64 on x86-64 (not a Raspberry Pi)",
        "checkout": str(CHECKOUT),
        "site_packages_mb": round(install["site_packages_bytes"] / 1e6, 1),
        "edge_clientapp_cold_import_s": {
            "runs": imports,
            "median": statistics.median(imports),
            "heavy_modules_loaded": install["import_loaded"],
        },
    }


def federation_summary(
    with_edge: dict[str, Any], without: dict[str, Any], control: dict[str, Any], memory: PeakMemory
) -> dict[str, Any]:
    rows = with_edge["rows"]
    changed = head_distance(with_edge["head"], without["head"])
    noise = head_distance(without["head"], control["head"])
    return {
        "round_seconds_with_edge": [row["seconds"] for row in rows],
        "round_seconds_without_edge": [row["seconds"] for row in without["rows"]],
        "replies_rejected_per_round": [[r["num_replies"], r["num_rejected"]] for r in rows],
        "edge_reply_accepted_every_round": all(
            r["num_replies"] == 3 and r["num_rejected"] == 0 for r in rows
        ),
        "test_accuracy_with_edge": [r.get("test_accuracy") for r in rows],
        "edge_node_peak_rss_mb": {
            "supernode_vmhwm": round(memory.peak_kb.get("flower-supernode", 0) / 1024, 1),
            "clientapp_vmhwm": round(memory.peak_kb.get("flwr-clientapp", 0) / 1024, 1),
            "all_processes_vmrss_sum": round(memory.peak_total_kb / 1024, 1),
        },
        "head_max_abs_diff_with_vs_without_edge": changed,
        "head_max_abs_diff_control_without_vs_without": noise,
        "head_changed_by_edge": changed > 100 * noise + 1e-6,
    }


def main() -> int:
    """Writes result.json whatever happens to the federation; 1 if it did not finish."""
    from deploy_helpers import app_copy

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the nodes

    shutil.rmtree(OUT / "outputs", ignore_errors=True)
    shutil.rmtree(OUT / "deploy", ignore_errors=True)
    shutil.rmtree(OUT / "app", ignore_errors=True)
    app = app_copy(OUT / "app")
    write_dataset()
    federation = MixedDeployment(
        3,
        OUT / "deploy",
        port_base=0,
        edge_nodes=1,
        fast=False,  # Flower's own SuperNodes, as measured in docs/edge.md
        workdir=OUT,
        startup_timeout=900,
    )
    (ROOT / GUEST_RUN.lstrip("/")).mkdir(parents=True, exist_ok=True)
    result = {**install_summary(), "edge_node_data": edge_local_data(federation)}
    try:
        started = time.monotonic()
        with PeakMemory() as memory:
            federation.start()
            result["edge_supernode_startup_s"] = round(time.monotonic() - started, 1)
            with_edge = run(federation, app, "with-edge", 3)
        federation.stop_node(EDGE)
        without = run(federation, app, "without-edge", 2)
        control = run(federation, app, "without-edge-again", 2)
        result.update(federation_summary(with_edge, without, control, memory))
    except Exception as error:  # reported in the JSON next to what was measured
        result["federation_error"] = f"{type(error).__name__}: {error}"
    finally:
        federation.stop()
        result["leftover_processes"] = federation.leftover_processes()
        (OUT / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 1 if "federation_error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
