"""The vertical apps over Flower messages: a coordinator ServerApp and two party ClientApps.

Messages cross Flower's wire format (message_to_proto/message_from_proto); the apps,
the PSI and the Paillier arithmetic run for real, only delivery is in-process.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity
from phe import EncodedNumber, PaillierPublicKey
from sklearn.metrics import roc_auc_score

from fedge.config import FedgeConfig
from fedge.simulation import NodeGrid
from fedge.vertical.auth import write_keypair
from fedge.vertical.coordinator import RESULT_KEY, coordinate
from fedge.vertical.data import PartyTable, breast_cancer_parties, write_party_csv
from fedge.vertical.errors import VerticalError
from fedge.vertical.party import party_app

GUEST, HOST = 11, 22


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages carry the sending task's identity (Flower sets it at runtime)."""
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class PartyGrid(NodeGrid):
    """Delivers each message to a party ClientApp; a party's exception becomes an error
    reply (as a SuperNode sends it); `drop_after` makes a node go silent."""

    def __init__(self, contexts: dict[int, Context], drop_after: dict[int, int] | None = None):
        super().__init__(contexts)
        self.contexts = contexts
        self.drop_after = drop_after or {}
        self.seen: dict[int, int] = {}
        self.wire: list[bytes] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.seen[node] = self.seen.get(node, 0) + 1
            if self.seen[node] > self.drop_after.get(node, 10**9):
                continue
            proto = message_to_proto(message)
            self.wire.append(proto.SerializeToString())
            received = message_from_proto(proto)
            try:
                reply = party_app(received, self.contexts[node])
            except Exception as err:  # what a SuperNode reports back
                reply = Message(
                    Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=received
                )
            reply_proto = message_to_proto(reply)
            self.wire.append(reply_proto.SerializeToString())
            replies.append(message_from_proto(reply_proto))
        return replies


def _subset(table: PartyTable, patients: range) -> PartyTable:
    rows = [n for n, i in enumerate(table.ids) if int(i[-4:]) in patients]
    y = None if table.y is None else table.y[rows]
    return PartyTable([table.ids[n] for n in rows], table.x[rows], y, table.columns)


def _tables(
    tmp_path: Path, guest_patients: range, host_patients: range
) -> tuple[Path, Path, PartyTable, PartyTable]:
    """Two CSVs from the bundled split; rows keep the split's shuffled, differing orders."""
    guest, host = breast_cancer_parties(seed=1)
    guest, host = _subset(guest, guest_patients), _subset(host, host_patients)
    paths = tmp_path / "guest.csv", tmp_path / "host.csv"
    write_party_csv(guest, paths[0], id_column="id", label_column="diagnosis")
    write_party_csv(host, paths[1], id_column="id", label_column="diagnosis")
    return *paths, guest, host


def _keys(tmp_path: Path) -> dict[int, dict[str, str]]:
    """Each party's Ed25519 key and the other's public key, as node-config paths."""
    for node in (GUEST, HOST):
        write_keypair(tmp_path / f"{node}.key", tmp_path / f"{node}.pub")
    return {
        node: {"sign-key": str(tmp_path / f"{node}.key"), "peer-key": str(tmp_path / f"{peer}.pub")}
        for node, peer in ((GUEST, HOST), (HOST, GUEST))
    }


def _run(
    tmp_path: Path,
    guest_csv: Path,
    host_csv: Path,
    drop_after=None,
    score: tuple[Path | None, Path | None] | None = None,
    signed: bool = False,
    **extra: Any,
):
    config = FedgeConfig.from_run_config(
        {
            "num-server-rounds": 2,
            "batch-size": 32,
            "lr": 0.3,
            "round-timeout": 5.0,
            "id-column": "id",
            "label-column": "diagnosis",
            "vertical-key-bits": 1024,
            "vertical-tol": 0.0,
            "output-dir": str(tmp_path / "out"),
            **extra,
        }
    ).to_run_config()
    pairs = zip((GUEST, HOST), score or (None, None), strict=True)
    scores = {node: path for node, path in pairs if path is not None}
    keys = _keys(tmp_path) if signed else {GUEST: {}, HOST: {}}
    contexts = {
        node: Context(
            run_id=1,
            node_id=node,
            node_config={
                "role": role,
                "local-data": str(path),
                **({"score-data": str(scores[node])} if node in scores else {}),
                **keys[node],
            },
            state=RecordDict(),
            run_config=config,
        )
        for node, role, path in ((GUEST, "guest", guest_csv), (HOST, "host", host_csv))
    }
    grid = PartyGrid(contexts, drop_after)
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    coordinate(grid, server)
    return server, grid


def test_vertical_run_aligns_trains_scores_and_leaks_no_raw_values(tmp_path: Path) -> None:
    guest_csv, host_csv, guest, host = _tables(tmp_path, range(60, 150), range(90, 180))
    new = tmp_path / "new"
    new.mkdir()
    new_guest_csv, new_host_csv, new_guest, new_host = _tables(
        new, range(200, 260), range(230, 290)
    )
    server, grid = _run(
        tmp_path, guest_csv, host_csv, score=(new_guest_csv, new_host_csv), signed=True
    )
    result = server.state.config_records[RESULT_KEY]
    common = set(guest.ids) & set(host.ids)
    assert result["rows"] == len(common) >= 32
    assert result["epochs"] == 2 and result["loss"][1] < result["loss"][0] < np.log(2) + 1e-9
    parts = {
        role: json.loads((tmp_path / "out" / "vertical" / f"vertical-{role}.json").read_text())
        for role in ("guest", "host")
    }
    assert parts["guest"]["columns"] == guest.columns and parts["host"]["columns"] == host.columns
    joined = sorted(common)
    g_rows, h_rows = guest.aligned(joined), host.aligned(joined)
    score = sum(
        ((t.x - np.array(p["mean"])) / np.array(p["std"])) @ np.array(p["weights"]) + p["bias"]
        for t, p in ((g_rows, parts["guest"]), (h_rows, parts["host"]))
    )
    assert roc_auc_score(g_rows.y, score) > 0.9  # the two exported parts score jointly
    # Joint scoring of the new shared IDs: the guest's file holds exactly those, with the
    # probabilities the two parts give in the clear.
    shared = sorted(set(new_guest.ids) & set(new_host.ids))
    assert result["scored"] == len(shared) == 30
    lines = (tmp_path / "out" / "vertical" / "vertical-scores.csv").read_text().split()[1:]
    got = {line.split(",")[0]: float(line.split(",")[1]) for line in lines}
    g_new, h_new = new_guest.aligned(shared), new_host.aligned(shared)
    logit = sum(
        ((t.x - np.array(p["mean"])) / np.array(p["std"])) @ np.array(p["weights"]) + p["bias"]
        for t, p in ((g_new, parts["guest"]), (h_new, parts["host"]))
    )
    assert list(got) == shared
    assert np.allclose(list(got.values()), 1 / (1 + np.exp(-logit)), atol=2e-6)
    wire = b"".join(grid.wire)
    all_ids = set(guest.ids) | set(host.ids) | set(new_guest.ids) | set(new_host.ids)
    assert not any(i.encode() in wire for i in all_ids)
    values = np.concatenate([guest.x.ravel(), guest.y, host.x.ravel(), new_host.x.ravel()])
    assert not any(np.float64(v).tobytes() in wire for v in values if v != 0)


def test_no_overlap_is_one_clear_error(tmp_path: Path) -> None:
    guest_csv, host_csv, guest, host = _tables(tmp_path, range(60, 100), range(90, 130))
    assert len(set(guest.ids) & set(host.ids)) < 16
    with pytest.raises(VerticalError, match="no overlap"):
        _run(tmp_path, guest_csv, host_csv)


def test_missing_label_column_is_refused(tmp_path: Path) -> None:
    guest_csv, host_csv, _, _ = _tables(tmp_path, range(60, 120), range(90, 150))
    with pytest.raises(
        VerticalError, match=r"node 11 refused stage 'hello'.*no label column 'target'"
    ):
        _run(tmp_path, guest_csv, host_csv, **{"label-column": "target"})


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    guest_csv, host_csv, _, _ = _tables(tmp_path, range(60, 120), range(90, 150))
    lines = host_csv.read_text().splitlines()
    host_csv.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(VerticalError, match=r"host refused stage 'psi-offer'.*duplicate ID"):
        _run(tmp_path, guest_csv, host_csv)


def test_a_party_that_drops_stops_the_run(tmp_path: Path) -> None:
    guest_csv, host_csv, _, _ = _tables(tmp_path, range(60, 150), range(90, 180))
    with pytest.raises(VerticalError, match="the host did not answer stage 'logits'"):
        _run(tmp_path, guest_csv, host_csv, drop_after={HOST: 5})


@pytest.mark.slow
def test_vertical_run_in_flowers_simulation_engine() -> None:
    """Two simulated SuperNodes (partition 0 → guest, 1 → host) on the bundled split."""
    from fedge.simulation import run_inprocess
    from fedge.vertical.coordinator import coordinator_app

    config = {
        "dataset": "breast-cancer",
        "num-server-rounds": 1,
        "lr": 0.15,
        "vertical-key-bits": 1024,
        "round-timeout": 300.0,
    }
    context = run_inprocess(config, 2, server_app=coordinator_app, client_app=party_app)
    guest, host = breast_cancer_parties(seed=FedgeConfig().seed)
    result = context.state.config_records[RESULT_KEY]
    assert result["rows"] == len(set(guest.ids) & set(host.ids))
    assert result["loss"][0] < np.log(2)


def test_score_data_on_one_side_only_is_refused(tmp_path: Path) -> None:
    guest_csv, host_csv, _, _ = _tables(tmp_path, range(60, 120), range(90, 150))
    with pytest.raises(VerticalError, match="only the guest has score-data"):
        _run(tmp_path, guest_csv, host_csv, score=(guest_csv, None))


class OracleGrid(PartyGrid):
    """A tampering coordinator: in the first `unmask` it hands the guest the guest's own
    [[e]] (e = z/4 − y/2) in place of the host's padded gradient, to have it decrypted."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        super().__init__(contexts)
        self.stolen: dict[str, Any] = {}
        self.opened: list[tuple[int, int]] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        for message in messages:
            record = message.content.config_records["vertical"]
            if record["vertical-stage"] == "unmask" and not self.opened:
                width = len(record["h-c"]) // len(record["h-e"])
                count = len(record["h-e"])
                record["h-c"] = self.stolen["e_c"][: width * count]
                record["h-e"] = self.stolen["e_e"][:count]
        replies = super().send_and_receive(messages, timeout=timeout)
        for message, reply in zip(messages, replies, strict=True):
            stage = message.content.config_records["vertical"]["vertical-stage"]
            if reply.has_error():
                continue
            content = reply.content.config_records["vertical"]
            if stage == "residuals":
                batch = message.content.config_records["vertical"]["batch"]
                self.stolen.update(e_c=content["e-c"], e_e=content["e-e"])
                self.stolen["batch"] = np.frombuffer(batch, dtype=np.int64)
            if stage == "psi-intersect" and message.metadata.dst_node_id == GUEST:
                self.stolen["key"] = content["key"]
            if stage == "unmask" and not self.opened:
                width = len(content["hg-v"]) // len(content["hg-e"])
                exps = np.frombuffer(content["hg-e"], dtype=np.int8)
                self.opened = [
                    (int.from_bytes(content["hg-v"][i * width : (i + 1) * width], "big"), int(e))
                    for i, e in enumerate(exps)
                ]
        return replies


def _oracle_run(tmp_path: Path, signed: bool) -> tuple[OracleGrid, PartyTable, PartyTable]:
    guest_csv, host_csv, guest, host = _tables(tmp_path, range(60, 150), range(90, 180))
    config = FedgeConfig.from_run_config(
        {
            "num-server-rounds": 1,
            "batch-size": 32,
            "id-column": "id",
            "vertical-key-bits": 1024,
            "label-column": "diagnosis",
            "output-dir": str(tmp_path / "out"),
        }
    ).to_run_config()
    keys = _keys(tmp_path) if signed else {GUEST: {}, HOST: {}}
    contexts = {
        node: Context(
            run_id=1,
            node_id=node,
            node_config={"role": role, "local-data": str(path), **keys[node]},
            state=RecordDict(),
            run_config=config,
        )
        for node, role, path in ((GUEST, "guest", guest_csv), (HOST, "host", host_csv))
    }
    grid = OracleGrid(contexts)
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    if signed:
        with pytest.raises(
            VerticalError, match=r"refused stage 'unmask'.*fails its signature.*by the coordinator"
        ):
            coordinate(grid, server)
    else:  # the host notices its gradient came back wrong, after the labels have leaked
        with pytest.raises(VerticalError, match="do not match what we sent"):
            coordinate(grid, server)
    return grid, guest, host


def test_unsigned_a_tampering_coordinator_reads_labels(tmp_path: Path) -> None:
    """The documented semi-honest limit, shown: the guest's decryption is an oracle."""
    grid, guest, host = _oracle_run(tmp_path, signed=False)
    key = PaillierPublicKey(int.from_bytes(grid.stolen["key"], "big"))
    e = np.array([EncodedNumber(key, v, x).decode() for v, x in grid.opened])
    assert len(e) == 20  # as many as the host has columns
    rows = guest.aligned(sorted(set(guest.ids) & set(host.ids)))
    labels = rows.y[grid.stolen["batch"][:20]]
    assert np.allclose(e, 0.5 - labels)  # w = 0 in batch one: e = -y/2 with y = 2·label − 1


def test_signed_messages_stop_a_tampering_coordinator(tmp_path: Path) -> None:
    grid, _, _ = _oracle_run(tmp_path, signed=True)
    assert grid.opened == []
