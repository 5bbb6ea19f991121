"""Drives one SecAgg+ training round over Flower's Grid.

Setup and key sharing are extra `grid.send_and_receive` exchanges before the
training messages go out; the masked upload rides on the training messages
themselves, and the unmasking exchange follows once they are back. The unmask
requests also collect every client's keys for the next round, so from the
second round on the setup exchange goes only to clients without them (usually
none). The protocol logic lives in `fedge.secagg`; this module only moves its
payloads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedge.config import FedgeConfig
from fedge.records import payload_to_records, records_to_payload
from fedge.secagg import Advertisements, AggregateResult, SecAggServer, Stage
from fedge.secagg.messages import Payload
from fedge.server_app.polling import destinations, replying_node
from fedge.server_app.privacy import ServerPrivacy


class SecureRound:
    """One round's server-side protocol state: `open` before training, `close` after."""

    def __init__(self, grid: Grid, timeout: float, advertised: Advertisements | None) -> None:
        """`advertised`: the previous round's `AggregateResult.next_round`, if any."""
        self.grid = grid
        self.timeout = timeout
        self.advertised = advertised
        self.server: SecAggServer | None = None

    def _exchange(self, stage: Stage, payloads: dict[int, Payload]) -> dict[int, Payload]:
        if not payloads:
            return {}
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

    @staticmethod
    def payloads_of(replies: Iterable[Message], sent: Mapping[str, int]) -> dict[int, Payload]:
        """Replies as payloads; an error reply is a dropout (the protocol records why)."""
        payloads = {}
        for reply in replies:
            node = replying_node(reply, sent)
            if reply.has_error():
                log(WARNING, "SecAgg: node %s failed: %s", node, reply.error.reason)
                continue
            payloads[node] = records_to_payload(reply.content)
        return payloads  # type: ignore[return-value]

    def open(
        self,
        train_messages: list[Message],
        num_shares: int,
        threshold: int,
        vector_length: int,
        clip_range: float,
        max_weight: int,
    ) -> list[Message]:
        """Run setup and key sharing; returns the training messages for the survivors.

        Raises `SecAggAbort` when fewer than `threshold` clients remain.
        """
        nodes = [message.metadata.dst_node_id for message in train_messages]
        advertised = self.advertised or Advertisements(os.urandom(32), {})
        self.server = SecAggServer(
            nodes,
            num_shares,
            threshold,
            vector_length,
            clip_range,
            max_weight,
            advertised.round_seed,
            advertised.keys,
        )
        setup = self.server.setup_payloads()
        log(INFO, "SecAgg: %s of %s clients advertised keys", len(nodes) - len(setup), len(nodes))
        keys = self._exchange(Stage.SETUP, setup)
        shares = self._exchange(Stage.SHARE_KEYS, self.server.receive_public_keys(keys))
        uploads = self.server.receive_encrypted_shares(shares)
        log(INFO, "SecAgg: %s of %s clients shared keys", len(uploads), len(nodes))
        messages = []
        for message in train_messages:
            node = message.metadata.dst_node_id
            if node not in uploads:
                continue
            content = RecordDict(
                {
                    "arrays": message.content.array_records["arrays"],
                    "config": message.content.config_records["config"],
                    **payload_to_records(uploads[node]),
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
        """Collect masked uploads, run the unmasking exchange, return the decoded sum.

        `sent` maps the training messages' ids to their nodes (see `destinations`).
        """
        if self.server is None:
            raise RuntimeError("SecureRound.close() called before open()")
        unmask = self.server.receive_masked_inputs(self.payloads_of(replies, sent), os.urandom(32))
        result = self.server.receive_unmask_shares(self._exchange(Stage.UNMASK, unmask))
        for node, reason in result.dropped.items():
            log(WARNING, "SecAgg: node %s left out: %s", node, reason)
        log(INFO, "SecAgg: summed %s clients' masked updates", result.num_clients)
        return result


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
            config.secagg_max_weight,
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
