"""The party ClientApp of a vertical run: guest or host, answering the coordinator.

Every stage is one query message. A party keeps its secrets (PSI keys, Paillier key,
weights, pads) in `context.state`, never in a reply, so a stage may run in a fresh
process, and it checks every peer value before computing on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedge.atomic import write_atomically
from fedge.client_app.protocol import (
    LOCAL_DATA_KEY,
    PEER_KEY,
    ROLE_KEY,
    SCORE_DATA_KEY,
    SIGN_KEY,
    VERTICAL_KEY,
    VERTICAL_STAGE_KEY,
)
from fedge.config import FedgeConfig, resolve_path
from fedge.vertical.auth import PeerLink
from fedge.vertical.data import PartyTable, breast_cancer_parties, read_party_csv
from fedge.vertical.errors import VerticalError
from fedge.vertical.hetero_lr import Guest, Host, Party, Settings, public_key_bytes
from fedge.vertical.psi import Offer, PsiParty

party_app = ClientApp()

LR_STATE = "vertical-lr"
SCORES_STATE = "vertical-scores"
TABLES = ("train", "score")
"""A PSI aligns the training rows (`local-data`) or the rows to score (`score-data`)."""

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

    def _score_table(self) -> PartyTable:
        """The rows to score (`score-data`): the training table's columns, no label needed."""
        path = self.context.node_config.get(SCORE_DATA_KEY)
        if not path:
            raise VerticalError(
                "this party has no score-data: start it with --node-config "
                "\"score-data='new.csv'\" to score new shared IDs"
            )
        table = read_party_csv(
            str(path),
            id_column=self.config.id_column,
            label_column=self.config.label_column,
            guest=False,
        )
        if table.columns != self.table.columns:
            raise VerticalError(
                f"{path}: its columns differ from local-data's {self.table.columns}"
            )
        return table

    def _table(self, peer: Reply) -> tuple[str, PartyTable]:
        name = peer.get("table", "train")
        if name not in TABLES:
            raise VerticalError(f"unknown table {str(name)[:20]!r}: 'train' or 'score'")
        return name, self.table if name == "train" else self._score_table()

    def link(self) -> PeerLink | None:
        """The signing link when this node has sign-key and peer-key, else None."""
        own, peer = (self.context.node_config.get(k) for k in (SIGN_KEY, PEER_KEY))
        if not own and not peer:
            return None
        if not own or not peer:
            raise VerticalError("give this party both sign-key and peer-key, or neither")
        return PeerLink(Path(str(own)), Path(str(peer)), self.context.run_id)

    def checked(self, link: PeerLink | None, stage: str, peer: Reply) -> None:
        """Verify the peer's signed payload this stage consumes (when signing is on)."""
        sender_stage = RECEIVES.get(stage)
        if link is None or sender_stage is None or (stage == "logits" and "hg-v" not in peer):
            return
        counts = dict(self.context.state.config_records.get(LINK_STATE, {}))
        seq = int(counts.get("received", 0)) + 1
        payload = {k: peer.get(k) for k in SENDS[sender_stage]}
        peer_role = "host" if self.role == "guest" else "guest"
        link.verify(peer_role, sender_stage, seq, payload, peer.get("sig"))
        self._save(LINK_STATE, {**counts, "received": seq})

    def signed(self, link: PeerLink | None, stage: str, reply: Reply) -> Reply:
        """Sign the part of our reply that goes on to the peer (when signing is on)."""
        if link is None or not all(k in reply for k in SENDS.get(stage, ("-",))):
            return reply  # nothing of this reply goes on (e.g. the scoring PSI's row count)
        counts = dict(self.context.state.config_records.get(LINK_STATE, {}))
        seq = int(counts.get("sent", 0)) + 1
        payload = {k: reply[k] for k in SENDS[stage]}
        self._save(LINK_STATE, {**counts, "sent": seq})
        return {**reply, "sig": link.sign(self.role, stage, seq, payload)}

    def _saved(self, name: str) -> dict[str, Any]:
        if name not in self.context.state.config_records:
            raise VerticalError(f"stage out of order: this party has no {name} yet")
        return dict(self.context.state.config_records[name])

    def _save(self, name: str, values: dict[str, Any]) -> None:
        self.context.state.config_records[name] = ConfigRecord(values)

    def _psi(self, table: str, ids: list[str], fresh: bool = False) -> PsiParty:
        state = None if fresh else self._saved(f"vertical-psi-{table}")
        return PsiParty(ids, max_ids=self.config.vertical_max_ids, state=state)

    def _aligned(self, name: str, table: PartyTable) -> PartyTable:
        return table.aligned(list(self._saved(f"vertical-aligned-{name}")["ids"]))

    def _lr(self, fresh: bool = False) -> Party:
        aligned = self._aligned("train", self.table)
        state = None if fresh else self._saved(LR_STATE)
        if self.role == "guest":
            return Guest(aligned.x, aligned.y, settings_of(self.config), state)
        return Host(aligned.x, settings_of(self.config), state)

    def _keep(self, party: Party) -> None:
        self._save(LR_STATE, party.state())

    def hello(self, _: Reply) -> Reply:
        scoring = bool(self.context.node_config.get(SCORE_DATA_KEY))
        return {"role": self.role, "scoring": scoring}

    def psi_offer(self, peer: Reply) -> Reply:
        name, table = self._table(peer)
        psi = self._psi(name, table.ids, fresh=True)
        offer = psi.offer()
        self._save(f"vertical-psi-{name}", psi.state())
        return {"setup": offer.setup, "request": offer.request}

    def psi_answer(self, peer: Reply) -> Reply:
        name, table = self._table(peer)
        psi = self._psi(name, table.ids)
        answer = psi.answer(Offer(_bytes(peer, "setup"), _bytes(peer, "request")))
        self._save(f"vertical-psi-{name}", psi.state())
        return {"answer": answer}

    def psi_intersect(self, peer: Reply) -> Reply:
        """Align on the intersection; for training, also make this run's Paillier key."""
        name, table = self._table(peer)
        common = self._psi(name, table.ids).intersect(_bytes(peer, "answer"))
        self._save(f"vertical-aligned-{name}", {"ids": common})
        if name == "score":
            return {"rows": len(common)}
        if len(common) < self.config.vertical_min_batch:
            raise VerticalError(
                f"the parties share {len(common)} IDs, fewer than vertical-min-batch="
                f"{self.config.vertical_min_batch}: no overlap to train on"
            )
        party = self._lr(fresh=True)
        self._keep(party)
        features = int(self.table.x.shape[1])
        return {"rows": len(common), "key": public_key_bytes(party.public), "features": features}

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
        path = self._folder() / f"vertical-{self.role}.json"
        text = json.dumps({"role": self.role, **self._lr().export(self.table.columns)}, indent=2)
        write_atomically(path, lambda tmp: tmp.write_text(text))
        return {"sha256": hashlib.sha256(text.encode()).hexdigest()}

    def score_logits(self, _: Reply) -> Reply:
        """Host: [[u]]_H for every shared row to score."""
        return self._host().score_logits(self._aligned("score", self._score_table()).x)

    def score_pad(self, peer: Reply) -> Reply:
        """Guest: padded joint logits, for the host to open without reading them."""
        rows = self._aligned("score", self._score_table())
        message, pads, exps = self._guest().score_pad(rows.x, peer)
        self._save(SCORES_STATE, {"pads": [str(r) for r in pads], "exps": exps})
        return message

    def score_open(self, peer: Reply) -> Reply:
        """Host: decrypt the guest's padded logits (it reads logit + pad only)."""
        count = len(self._saved("vertical-aligned-score")["ids"])
        return self._host().score_open(peer, count)

    def score_finish(self, peer: Reply) -> Reply:
        """Guest: unpad the logits and write id,probability to its own output folder."""
        saved = self._saved(SCORES_STATE)
        pads, exps = [int(r) for r in saved["pads"]], [int(e) for e in saved["exps"]]
        z = self._guest().score_finish(peer, pads, exps)
        ids = list(self._saved("vertical-aligned-score")["ids"])
        rows = (f"{i},{1 / (1 + np.exp(-v)):.6f}" for i, v in zip(ids, z, strict=True))
        text = "\n".join(["id,probability", *rows]) + "\n"
        write_atomically(self._folder() / "vertical-scores.csv", lambda tmp: tmp.write_text(text))
        return {"scored": len(ids)}

    def _folder(self) -> Path:
        return resolve_path(self.config.output_dir) / (self.config.run_name or "vertical")

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
    "score-logits": PartyNode.score_logits,
    "score-pad": PartyNode.score_pad,
    "score-open": PartyNode.score_open,
    "score-finish": PartyNode.score_finish,
}
"""Every stage a party answers, in protocol order (the coordinator's names too)."""

SENDS: dict[str, tuple[str, ...]] = {
    "psi-offer": ("setup", "request"),
    "psi-answer": ("answer",),
    "psi-intersect": ("key", "features"),
    "logits": ("u-c", "u-e", "u2-c", "u2-e"),
    "residuals": ("e-c", "e-e", "g-c", "g-e", "loss-c", "loss-e"),
    "gradients": ("h-c", "h-e", "gg-v", "gg-e"),
    "unmask": ("hg-v", "hg-e"),
    "score-logits": ("u-c", "u-e"),
    "score-pad": ("z-c", "z-e"),
    "score-open": ("zs-v", "zs-e"),
}
"""The keys of a stage's reply that go on to the peer (signed, when keys are set)."""

RECEIVES: dict[str, str] = {
    "psi-answer": "psi-offer",
    "psi-intersect": "psi-answer",
    "meet": "psi-intersect",
    "residuals": "logits",
    "gradients": "residuals",
    "unmask": "gradients",
    "logits": "unmask",
    "apply": "unmask",
    "score-pad": "score-logits",
    "score-open": "score-pad",
    "score-finish": "score-open",
}
"""For a stage, the peer's stage whose reply it consumes (`logits` only after batch one)."""

LINK_STATE = "vertical-link"


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
    node, peer = PartyNode(context), dict(record)
    link = node.link()
    node.checked(link, str(stage), peer)
    reply = node.signed(link, str(stage), STAGES[str(stage)](node, peer))
    return Message(RecordDict({VERTICAL_KEY: ConfigRecord(reply)}), reply_to=message)
