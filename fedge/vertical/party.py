"""The party ClientApp of a vertical run: guest or host, answering the coordinator.

Every stage is one query message. A party keeps its secrets (PSI keys, Paillier key,
weights, pads) in `context.state`, never in a reply, so a stage may run in a fresh
process, and it checks every peer value before computing on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedge.atomic import write_atomically
from fedge.client_app.protocol import LOCAL_DATA_KEY, ROLE_KEY, VERTICAL_KEY, VERTICAL_STAGE_KEY
from fedge.config import FedgeConfig, resolve_path
from fedge.vertical.data import PartyTable, breast_cancer_parties, read_party_csv
from fedge.vertical.errors import VerticalError
from fedge.vertical.hetero_lr import Guest, Host, Party, Settings, public_key_bytes
from fedge.vertical.psi import Offer, PsiParty

party_app = ClientApp()

PSI_STATE = "vertical-psi"
LR_STATE = "vertical-lr"
ALIGNED_STATE = "vertical-aligned"

Reply = dict[str, Any]


def node_role(context: Context) -> str:
    """`role` from the node config; in simulation partition 0 is the guest, 1 the host."""
    role = context.node_config.get(ROLE_KEY)
    if role is None and "partition-id" in context.node_config:
        role = ("guest", "host")[int(context.node_config["partition-id"]) % 2]
    if role not in ("guest", "host"):
        raise VerticalError(
            f"node config role={role!r}: start the SuperNode with --node-config "
            "\"role='guest'\" (holds the labels) or \"role='host'\""
        )
    return str(role)


def own_table(context: Context, config: FedgeConfig, role: str) -> PartyTable:
    """The node's own CSV (`local-data`), or its half of the bundled breast-cancer split."""
    path = context.node_config.get(LOCAL_DATA_KEY)
    if path:
        return read_party_csv(
            str(path),
            id_column=config.id_column,
            label_column=config.label_column,
            guest=role == "guest",
        )
    if config.dataset != "breast-cancer":
        raise VerticalError(
            "a vertical party needs its own CSV: start the SuperNode with --node-config "
            "\"local-data='party.csv'\" (or run dataset='breast-cancer' for the bundled split)"
        )
    guest, host = breast_cancer_parties(config.seed)
    return guest if role == "guest" else host


def settings_of(config: FedgeConfig) -> Settings:
    return Settings(
        key_bits=config.vertical_key_bits,
        lr=config.lr,
        l2=config.vertical_l2,
        min_batch=config.vertical_min_batch,
    )


class PartyNode:
    """One message's view of this node: its role, table and saved state."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = FedgeConfig.from_context(context)
        self.role = node_role(context)
        self.table = own_table(context, self.config, self.role)

    def _saved(self, name: str) -> dict[str, Any]:
        if name not in self.context.state.config_records:
            raise VerticalError(f"stage out of order: this party has no {name} yet")
        return dict(self.context.state.config_records[name])

    def _save(self, name: str, values: dict[str, Any]) -> None:
        self.context.state.config_records[name] = ConfigRecord(values)

    def _psi(self, fresh: bool = False) -> PsiParty:
        state = None if fresh else self._saved(PSI_STATE)
        return PsiParty(self.table.ids, max_ids=self.config.vertical_max_ids, state=state)

    def _lr(self, fresh: bool = False) -> Party:
        aligned = self.table.aligned(list(self._saved(ALIGNED_STATE)["ids"]))
        state = None if fresh else self._saved(LR_STATE)
        if self.role == "guest":
            return Guest(aligned.x, aligned.y, settings_of(self.config), state)
        return Host(aligned.x, settings_of(self.config), state)

    def _keep(self, party: Party) -> None:
        self._save(LR_STATE, party.state())

    def hello(self, _: Reply) -> Reply:
        return {"role": self.role, "features": int(self.table.x.shape[1])}

    def psi_offer(self, _: Reply) -> Reply:
        psi = self._psi(fresh=True)
        offer = psi.offer()
        self._save(PSI_STATE, psi.state())
        return {"setup": offer.setup, "request": offer.request}

    def psi_answer(self, peer: Reply) -> Reply:
        psi = self._psi()
        answer = psi.answer(Offer(_bytes(peer, "setup"), _bytes(peer, "request")))
        self._save(PSI_STATE, psi.state())
        return {"answer": answer}

    def psi_intersect(self, peer: Reply) -> Reply:
        """Align on the intersection and make this run's Paillier key."""
        common = self._psi().intersect(_bytes(peer, "answer"))
        if len(common) < self.config.vertical_min_batch:
            raise VerticalError(
                f"the parties share {len(common)} IDs, fewer than vertical-min-batch="
                f"{self.config.vertical_min_batch}: no overlap to train on"
            )
        self._save(ALIGNED_STATE, {"ids": common})
        party = self._lr(fresh=True)
        self._keep(party)
        return {"rows": len(common), "key": public_key_bytes(party.public)}

    def meet(self, peer: Reply) -> Reply:
        party = self._lr()
        party.meet(_bytes(peer, "key"), int(peer["features"]))
        self._keep(party)
        return {}

    def logits(self, peer: Reply) -> Reply:
        host = self._host()
        if "hg-v" in peer:  # the previous batch's gradient, unpadded by the guest
            host.apply(peer)
        out = host.logits(_batch(peer))
        self._keep(host)
        return out

    def residuals(self, peer: Reply) -> Reply:
        guest = self._guest()
        out, (pad, exponent) = guest.residuals(_batch(peer), peer)
        self._keep(guest)
        return {**out, "loss-pad": str(pad), "loss-exp": exponent}

    def gradients(self, peer: Reply) -> Reply:
        host = self._host()
        out, (value, exponent) = host.gradients(peer)
        self._keep(host)
        return {**out, "loss-value": str(value), "loss-exp": exponent}

    def unmask(self, peer: Reply) -> Reply:
        guest = self._guest()
        out = guest.unmask(peer)
        self._keep(guest)
        return out

    def apply(self, peer: Reply) -> Reply:
        host = self._host()
        host.apply(peer)
        self._keep(host)
        return {}

    def export(self, _: Reply) -> Reply:
        """Write our part of the model to our own output folder; reply with its digest."""
        name = self.config.run_name or "vertical"
        path = resolve_path(self.config.output_dir) / name / f"vertical-{self.role}.json"
        text = json.dumps({"role": self.role, **self._lr().export(self.table.columns)}, indent=2)
        write_atomically(path, lambda tmp: tmp.write_text(text))
        return {"sha256": hashlib.sha256(text.encode()).hexdigest()}

    def _host(self) -> Host:
        party = self._lr()
        if not isinstance(party, Host):
            raise VerticalError("a host stage was sent to the guest: refused")
        return party

    def _guest(self) -> Guest:
        party = self._lr()
        if not isinstance(party, Guest):
            raise VerticalError("a guest stage was sent to the host: refused")
        return party


STAGES: dict[str, Callable[[PartyNode, Reply], Reply]] = {
    "hello": PartyNode.hello,
    "psi-offer": PartyNode.psi_offer,
    "psi-answer": PartyNode.psi_answer,
    "psi-intersect": PartyNode.psi_intersect,
    "meet": PartyNode.meet,
    "logits": PartyNode.logits,
    "residuals": PartyNode.residuals,
    "gradients": PartyNode.gradients,
    "unmask": PartyNode.unmask,
    "apply": PartyNode.apply,
    "export": PartyNode.export,
}
"""Every stage a party answers, in protocol order (the coordinator's names too)."""


def _bytes(peer: Reply, key: str) -> bytes:
    value = peer.get(key)
    if not isinstance(value, bytes):
        raise VerticalError(f"the message lacks bytes {key!r}")
    return value


def _batch(peer: Reply) -> list[int]:
    raw = _bytes(peer, "batch")
    if len(raw) % 8:
        raise VerticalError("a batch is not a whole number of int64 row indices")
    return np.frombuffer(raw, dtype=np.int64).tolist()


@party_app.query()
def answer(message: Message, context: Context) -> Message:
    """Run the stage the coordinator asks for; a refusal is an error reply naming why."""
    record = message.content.config_records.get(VERTICAL_KEY)
    stage = None if record is None else record.get(VERTICAL_STAGE_KEY)
    if stage not in STAGES:
        raise VerticalError(f"unknown vertical stage {str(stage)[:40]!r}")
    reply = STAGES[str(stage)](PartyNode(context), dict(record))
    return Message(RecordDict({VERTICAL_KEY: ConfigRecord(reply)}), reply_to=message)
