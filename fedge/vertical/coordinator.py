"""The coordinator ServerApp of a vertical run (the arbiter): it relays, it holds no key.

It finds one guest and one host, has them align rows by PSI, then runs hetero LR
batch by batch: host `logits` → guest `residuals` → host `gradients` → guest `unmask`,
the host applying each unpadded gradient with the next batch. It forwards only the
keys each stage's receiver expects (so a party cannot slip anything else to the
other), learns the loss from the host's padded value and the guest's pad, and stops
on `vertical-tol` or after `num-server-rounds` epochs; then each party writes its own
part of the model (`output-dir`/`run-name`/vertical-<role>.json) on its own machine and,
when both have `score-data`, the shared new IDs are scored jointly (the guest keeps them).
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedge.client_app.protocol import VERTICAL_KEY, VERTICAL_STAGE_KEY
from fedge.config import FedgeConfig
from fedge.server_app.polling import destinations, replying_node
from fedge.server_app.validation import client_error
from fedge.vertical.errors import VerticalError
from fedge.vertical.hetero_lr import loss_from_pad
from fedge.vertical.party import RECEIVES, SENDS

coordinator_app = ServerApp()

RESULT_KEY = "vertical-result"
"""Server-context record the run's outcome lands in (rows, epochs, per-epoch loss, and
the digests of the model parts each party wrote to its own output folder)."""


class Coordinator:
    """Drives one vertical run over a Flower Grid; sees ciphertexts, pads and the loss."""

    def __init__(self, grid: Grid, config: FedgeConfig) -> None:
        self.grid, self.config = grid, config
        self.nodes: dict[str, int] = {}
        self.host_key = b""
        self.scoring = False

    def ask(self, role: str, stage: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """One stage on one party; an error reply or a missing reply fails the run."""
        return self.ask_both({role: (stage, payload or {})})[role]

    def ask_both(self, asks: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        messages = {
            role: Message(
                RecordDict({VERTICAL_KEY: ConfigRecord({VERTICAL_STAGE_KEY: stage, **payload})}),
                dst_node_id=self.nodes[role],
                message_type=MessageType.QUERY,
            )
            for role, (stage, payload) in asks.items()
        }
        sent = list(messages.values())
        replies = list(self.grid.send_and_receive(sent, timeout=self.config.round_timeout))
        by_node = {replying_node(r, destinations(sent)): r for r in replies}
        out = {}
        for role, (stage, _) in asks.items():
            reply = by_node.get(self.nodes[role])
            if reply is None:
                raise VerticalError(
                    f"the {role} did not answer stage {stage!r} within round-timeout="
                    f"{self.config.round_timeout}s: the run stops (a party dropped?)"
                )
            if reply.has_error():
                raise VerticalError(f"the {role} refused stage {stage!r}: {client_error(reply)}")
            record = reply.content.config_records.get(VERTICAL_KEY)
            if record is None:
                raise VerticalError(f"the {role}'s reply to {stage!r} has no vertical record")
            out[role] = dict(record)
        return out

    def relay(self, stage: str, reply: dict[str, Any]) -> dict[str, Any]:
        """What `stage` consumes of the peer's reply (`SENDS`, and its signature), nothing
        else: a party cannot slip the other anything more through the coordinator."""
        keys = SENDS[RECEIVES[stage]]
        missing = [k for k in keys if k not in reply]
        if missing:
            raise VerticalError(f"a party's reply lacks {missing} needed for stage {stage!r}")
        signature = {"sig": reply["sig"]} if "sig" in reply else {}
        return {**{k: reply[k] for k in keys}, **signature}

    def find_parties(self) -> None:
        """Wait for exactly one guest and one host."""
        deadline = time.monotonic() + self.config.round_timeout
        while len(nodes := list(self.grid.get_node_ids())) < 2:
            if time.monotonic() > deadline:
                raise VerticalError("fewer than two parties joined within round-timeout")
            time.sleep(1.0)
        if len(nodes) != 2:
            raise VerticalError(
                f"a vertical run takes two parties (a guest, a host), not {len(nodes)}"
            )
        self.nodes = {f"node {n}": n for n in nodes}
        hello = self.ask_both({name: ("hello", {}) for name in self.nodes})
        roles = {hello[name].get("role"): node for name, node in self.nodes.items()}
        if set(roles) != {"guest", "host"}:
            raise VerticalError(
                f"roles {sorted(map(str, roles))}: a vertical run needs one role='guest' "
                "and one role='host' node"
            )
        self.nodes = roles
        scoring = {h["role"]: bool(h.get("scoring")) for h in hello.values()}
        if scoring["guest"] != scoring["host"]:
            raise VerticalError(
                f"only the {'guest' if scoring['guest'] else 'host'} has score-data: give "
                "both parties a score-data CSV of the rows to score, or neither"
            )
        self.scoring = scoring["guest"]

    def intersect(self, table: str) -> tuple[int, dict[str, dict[str, Any]]]:
        """PSI both ways on the parties' `table` ('train' or 'score'); shared row count."""
        which = {"table": table}
        offers = self.ask_both({"guest": ("psi-offer", which), "host": ("psi-offer", which)})
        answers = self.ask_both(
            {
                "guest": ("psi-answer", {**which, **self.relay("psi-answer", offers["host"])}),
                "host": ("psi-answer", {**which, **self.relay("psi-answer", offers["guest"])}),
            }
        )
        done = self.ask_both(
            {
                role: ("psi-intersect", {**which, **self.relay("psi-intersect", answers[peer])})
                for role, peer in (("guest", "host"), ("host", "guest"))
            }
        )
        rows = {role: int(done[role]["rows"]) for role in done}
        if rows["guest"] != rows["host"]:
            raise VerticalError(f"the parties found different intersections {rows}: stopped")
        return rows["guest"], done

    def align(self) -> int:
        """PSI on the training rows, then exchange Paillier keys; the shared row count."""
        rows, done = self.intersect("train")
        self.host_key = done["host"]["key"]
        self.ask_both(
            {
                "guest": ("meet", self.relay("meet", done["host"])),
                "host": ("meet", self.relay("meet", done["guest"])),
            }
        )
        return rows

    def score(self) -> int:
        """Joint scoring of the shared IDs of both parties' score-data; the guest writes
        the probabilities to its own output folder. Returns the rows scored."""
        rows, _ = self.intersect("score")
        if rows == 0:
            return 0
        host = self.ask("host", "score-logits")
        guest = self.ask("guest", "score-pad", self.relay("score-pad", host))
        host = self.ask("host", "score-open", self.relay("score-open", guest))
        return int(self.ask("guest", "score-finish", self.relay("score-finish", host))["scored"])

    def batch(self, batch: np.ndarray, pending: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """One batch's four messages; returns its loss and the host's pending gradient."""
        index = {"batch": batch.astype(np.int64).tobytes()}
        host = self.ask("host", "logits", {**index, **pending})
        guest = self.ask("guest", "residuals", {**index, **self.relay("residuals", host)})
        host = self.ask("host", "gradients", self.relay("gradients", guest))
        loss = loss_from_pad(
            (int(str(host["loss-value"])), int(host["loss-exp"])),
            (int(str(guest["loss-pad"])), int(guest["loss-exp"])),
            self.host_key,
        )
        guest = self.ask("guest", "unmask", self.relay("unmask", host))
        return loss, self.relay("logits", guest)

    def train(self, rows: int) -> list[float]:
        """Epochs of shuffled mini-batches until the loss settles; the per-epoch loss."""
        rng = np.random.default_rng(self.config.seed)
        size = max(self.config.batch_size, self.config.vertical_min_batch)
        losses: list[float] = []
        pending: dict[str, Any] = {}
        for epoch in range(self.config.num_server_rounds):
            order = rng.permutation(rows)
            cuts = range(size, rows - size + 1, size)  # the last batch takes the remainder
            batch_losses = []
            for batch in np.split(order, list(cuts)):
                loss, pending = self.batch(batch, pending)
                batch_losses.append(loss)
            losses.append(float(np.mean(batch_losses)))
            log(INFO, "vertical epoch %d: loss %.5f", epoch + 1, losses[-1])
            if epoch and losses[-2] - losses[-1] < self.config.vertical_tol:
                break
        self.ask("host", "apply", pending)
        return losses


@coordinator_app.main()
def coordinate(grid: Grid, context: Context) -> None:
    """Align, train, and leave the result in the server context."""
    config = FedgeConfig.from_context(context)
    run = Coordinator(grid, config)
    run.find_parties()
    rows = run.align()
    losses = run.train(rows)
    exported = run.ask_both({"guest": ("export", {}), "host": ("export", {})})
    context.state.config_records[RESULT_KEY] = ConfigRecord(
        {
            "rows": rows,
            "epochs": len(losses),
            "loss": losses,
            "export-sha256": [str(exported[r]["sha256"]) for r in ("guest", "host")],
            "scored": run.score() if run.scoring else 0,
        }
    )
