"""Drives SecAgg+ training rounds over Flower's Grid, one round ahead on keys.

A round's five stages need five exchanges, but only three of them carry work
the round itself must wait for: the masked upload rides on the training
message, then the survivors sign the survivor set (the consistency check that
stops a server from unmasking one client) and unmask. So the next round's
SETUP rides on this round's training message and its SHARE_KEYS on this
round's unmask request, and a round whose sampled clients are exactly those
that completed that key sharing starts with its keys already shared: three
exchanges, two more than plain FedAvg (the consistency exchange is small: a
list of ids out, one signature back). Any other round (the first, or after a
client joined or dropped) runs setup and key sharing as extra exchanges of
its own first. The protocol logic lives in `fedge.secagg`; this module only
moves its payloads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from logging import INFO, WARNING

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedge.config import FedgeConfig
from fedge.records import payload_to_records, records_to_payload
from fedge.secagg import AggregateResult, SecAggAbort, SecAggParams, SecAggServer, Stage
from fedge.secagg.messages import Payload, nest, unnest
from fedge.server_app.polling import destinations, replying_node
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.validation import client_error

Payloads = dict[int, Payload]
Shape = Callable[[int], tuple[int, int]]  # clients -> (num_shares, threshold)


@dataclass(frozen=True)
class KeyedRound:
    """A round whose keys were shared during the previous one.

    `server` is past key sharing; `uploads` are the MASKED_INPUT payloads of its
    clients. Usable only for exactly its participants, none of them dropped, and
    the same parameters: anything else changes what every client agreed to.
    """

    server: SecAggServer
    uploads: Payloads

    def fits(self, params: SecAggParams) -> bool:
        """Whether this round can run as `params` asks (its own round seed aside)."""
        own = self.server.params
        return own == replace(params, round_seed=own.round_seed) and (
            self.server.active == own.participants
        )


class SecureRound:
    """One round's server-side protocol state: `open` before training, `close` after.

    After `close`, `next_round` holds the next round's `KeyedRound` if its key
    sharing completed (pass it to the next SecureRound), else None.
    """

    def __init__(
        self,
        grid: Grid,
        timeout: float,
        shape: Shape,
        keyed: KeyedRound | None,
        share_ahead: bool = True,
    ) -> None:
        self.grid = grid
        self.timeout = timeout
        self.shape = shape
        self.keyed = keyed
        self.share_ahead = share_ahead  # share the next round's keys during this one
        self.server: SecAggServer | None = None
        self.next_server: SecAggServer | None = None
        self.next_round: KeyedRound | None = None
        self.failures: dict[int, str] = {}  # nodes whose reply was an error, and why

    def _exchange(self, stage: Stage, payloads: Payloads) -> Payloads:
        messages = [
            Message(
                content=RecordDict(payload_to_records(payload)),
                dst_node_id=node,
                message_type=f"train.{stage.value}",
            )
            for node, payload in payloads.items()
        ]
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        return self.payloads_of(replies, destinations(messages))

    def payloads_of(
        self, replies: Iterable[Message], sent: Mapping[str, int], masked_length: int | None = None
    ) -> Payloads:
        """Replies as payloads; an error reply is a dropout, its reason kept in `failures`.

        A masked vector is decoded only where `masked_length` says one is due.
        """
        payloads = {}
        for reply in replies:
            node = replying_node(reply, sent)
            if reply.has_error():
                reason = client_error(reply)
                log(WARNING, "SecAgg: node %s failed: %s", node, reason)
                self.failures[node] = reason
                continue
            payloads[node] = records_to_payload(reply.content, masked_length)
        return payloads  # type: ignore[return-value]

    def open(
        self, train_messages: list[Message], vector_length: int, clip_range: float, max_weight: int
    ) -> list[Message]:
        """Share keys (unless done last round); returns the training messages for the survivors.

        Raises `SecAggAbort` when fewer than the round's threshold of clients remain.
        """
        nodes = [message.metadata.dst_node_id for message in train_messages]
        server = self._new_server(nodes, vector_length, clip_range, max_weight)
        if self.keyed is not None and self.keyed.fits(server.params):
            self.server, uploads = self.keyed.server, self.keyed.uploads
            log(INFO, "SecAgg: keys for this round were shared during the last one")
        else:
            self.server = server
            keys = self._exchange(Stage.SETUP, self.server.setup_payloads())
            shares = self._exchange(Stage.SHARE_KEYS, self.server.receive_public_keys(keys))
            uploads = self.server.receive_encrypted_shares(shares)
            log(INFO, "SecAgg: %s of %s clients shared keys", len(uploads), len(nodes))
        next_setup = (
            self._start_next_round(sorted(uploads), vector_length, clip_range, max_weight)
            if self.share_ahead
            else {}
        )
        messages = []
        for message in train_messages:
            node = message.metadata.dst_node_id
            if node not in uploads:
                continue
            payload = {**uploads[node], **nest(next_setup.get(node, {}))}
            content = RecordDict(
                {
                    "arrays": message.content.array_records["arrays"],
                    "config": message.content.config_records["config"],
                    **payload_to_records(payload),
                }
            )
            messages.append(
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=f"train.{Stage.MASKED_INPUT.value}",
                )
            )
        return messages

    def close(self, replies: Iterable[Message], sent: Mapping[str, int]) -> AggregateResult:
        """Collect masked uploads, run the consistency and unmask exchanges, return the sum.

        `sent` maps the training messages' ids to their nodes (see `destinations`).
        """
        if self.server is None:
            raise RuntimeError("SecureRound.close() called before open()")
        masked_length = self.server.params.vector_length + 1  # the weight entry is last
        uploads, next_keys = _split(self.payloads_of(replies, sent, masked_length))
        signatures = self._exchange(Stage.CONSISTENCY, self.server.receive_masked_inputs(uploads))
        unmask = self.server.receive_signatures(signatures)
        next_shares = self._advance_next_round(lambda server: server.receive_public_keys(next_keys))
        requests = {node: {**unmask[node], **nest(next_shares.get(node, {}))} for node in unmask}
        answers, next_ciphertexts = _split(self._exchange(Stage.UNMASK, requests))
        next_uploads = self._advance_next_round(
            lambda server: server.receive_encrypted_shares(next_ciphertexts)
        )
        if self.next_server is not None:
            self.next_round = KeyedRound(self.next_server, next_uploads)
        result = self.server.receive_unmask_shares(answers)
        for node, reason in result.dropped.items():
            log(WARNING, "SecAgg: node %s left out: %s", node, reason)
        for node, reason in result.unmask_faults.items():
            log(WARNING, "SecAgg: node %s misbehaved after its upload: %s", node, reason)
        log(INFO, "SecAgg: summed %s clients' masked updates", result.num_clients)
        return result

    def _start_next_round(
        self, nodes: list[int], vector_length: int, clip_range: float, max_weight: int
    ) -> Payloads:
        """The next round's server for `nodes`, and their SETUP payloads to nest."""
        try:
            self.next_server = self._new_server(nodes, vector_length, clip_range, max_weight)
        except ValueError as error:  # e.g. too few clients left for a next round
            log(INFO, "SecAgg: no key sharing ahead of the next round: %s", error)
            return {}
        return self.next_server.setup_payloads()

    def _new_server(
        self, nodes: list[int], vector_length: int, clip_range: float, max_weight: int
    ) -> SecAggServer:
        """A fresh round over `nodes`, shaped by `shape`, with a fresh round seed."""
        num_shares, threshold = self.shape(len(nodes))
        return SecAggServer(
            nodes, num_shares, threshold, vector_length, clip_range, max_weight, os.urandom(32)
        )

    def _advance_next_round(self, stage: Callable[[SecAggServer], Payloads]) -> Payloads:
        """Feed the next round's server one stage; an abort just ends the pipelining."""
        if self.next_server is None:
            return {}
        try:
            return stage(self.next_server)
        except SecAggAbort as abort:
            log(INFO, "SecAgg: the next round will share keys itself: %s", abort)
            self.next_server = None
            return {}


def _split(payloads: Payloads) -> tuple[Payloads, Payloads]:
    """Each node's payload for this round, and the nested next-round ones."""
    own: Payloads = {}
    nested: Payloads = {}
    for node, payload in payloads.items():
        own[node], inner = unnest(payload)
        if inner is not None:
            nested[node] = inner
    return own, nested


@dataclass(frozen=True)
class SecAggSettings:
    """The run's SecAgg+ knobs, resolved per round by `shape` and `encoding`."""

    num_shares: int
    threshold: int
    max_weight: int
    clip_norm: float
    timeout: float

    @classmethod
    def from_config(cls, config: FedgeConfig) -> SecAggSettings:
        return cls(
            config.secagg_num_shares,
            config.secagg_threshold,
            config.max_num_examples,
            config.secagg_clip_norm,
            config.round_timeout,
        )

    def shape(self, num_sampled: int) -> tuple[int, int]:
        """(num_shares, threshold) for a round with `num_sampled` clients.

        num_shares must be odd unless it spans everyone; the threshold must exceed
        half of it and defaults to about two thirds (Bell et al.'s usual choice).
        """
        num_shares = min(self.num_shares or num_sampled, num_sampled)
        if num_shares != num_sampled and num_shares % 2 == 0:
            num_shares -= 1
        default = max(num_shares // 2 + 1, math.ceil(2 * num_shares / 3))
        return num_shares, min(self.threshold or default, num_shares)

    def encoding(self, privacy: ServerPrivacy | None) -> tuple[float, int]:
        """(clip range, max weight) of the quantizer.

        Under DP every client weighs 1 (the sensitivity analysis assumes equal
        weights) and values stay within the clip norm, plus six standard
        deviations of a client's own noise share in distributed mode.
        """
        if privacy is None:
            return self.clip_norm, self.max_weight
        return privacy.clip_norm + 6 * privacy.client_noise_stddev(), 1
