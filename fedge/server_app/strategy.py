"""fedge's FedAvg: validated replies, update-based aggregation, server lr and momentum.

It extends Flower's `FedAvg` at its seams only (configure/aggregate methods);
Flower's own round loop (`Strategy.start`) drives it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedge.client_app.protocol import (
    CLIP_KEY,
    LOCAL_EPSILON_KEY,
    MAX_EXAMPLES_KEY,
    REPLY_KEY,
    UNCLIPPED_KEY,
    WEIGHT_KEY,
    encoding_config,
    model_digest,
)
from fedge.compression import Encoding
from fedge.edge.broadcast import BACKBONE_KEY
from fedge.edge.head import HEAD_BIAS, HEAD_WEIGHT
from fedge.records import NamedArrays, from_array_record, to_array_record, unflatten
from fedge.secagg import SecAggAbort
from fedge.server_app.acceptance import AcceptanceCheck
from fedge.server_app.aggregation import apply_update, summed
from fedge.server_app.polling import destinations, replying_node
from fedge.server_app.privacy import ServerPrivacy
from fedge.server_app.robust import InfluenceBound, SecureBounds
from fedge.server_app.secure_round import KeyedRound, SecAggSettings, SecureRound
from fedge.server_app.validation import (
    DEFAULT_MAX_NUM_EXAMPLES,
    CheckedReply,
    check_reply,
    checked_evaluation,
    masked_upload_reason,
)


@dataclass
class RoundReport:
    """What happened to the replies of one training round (for metrics.jsonl)."""

    num_sampled: int = 0
    num_replies: int = 0
    num_rejected: int = 0
    num_declined: int = 0
    rejected: dict[int, str] = field(default_factory=dict)
    train_loss: float | None = None
    aggregated: bool = False
    skip_reason: str | None = None  # why the model stayed unchanged this round
    epsilon: float | None = None
    client_epsilons: list[float] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)
    accept_loss: float | None = None  # the candidate model's acceptance loss, if checked


class RunFailing(RuntimeError):
    """Every reply failed the same way for `max-failed-rounds` rounds in a row."""


@dataclass(frozen=True)
class Accepted:
    """A validated reply, decoded once: `content` holds only its checked metrics
    (what Flower's metric aggregation reads), never the unchecked reply."""

    content: RecordDict
    update: NamedArrays
    metrics: MetricRecord


class FedgeAvg(FedAvg):
    """FedAvg on client *updates*: w ← w + η·Σ(n_k/n)·Δw_k, with optional server momentum.

    `rounds_done` offsets Flower's 1-based round counter so a resumed run keeps
    counting where the interrupted one stopped.
    """

    def __init__(
        self,
        *,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        rounds_done: int = 0,
        privacy: ServerPrivacy | None = None,
        edge_backbone: Callable[[NamedArrays], bytes] | None = None,
        secagg: SecAggSettings | None = None,
        max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
        influence: InfluenceBound | None = None,
        acceptance: AcceptanceCheck | None = None,
        max_failed_rounds: int = 0,
        compression: Encoding | None = None,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY, **fedavg_kwargs)  # type: ignore[arg-type]
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.rounds_done = rounds_done
        self.privacy = privacy
        self.edge_backbone = edge_backbone
        self.secagg = secagg
        self.max_num_examples = max_num_examples
        # Edge clients train only the head; a partial update is accepted from no one else.
        self.partial_names = (
            frozenset({HEAD_WEIGHT, HEAD_BIAS}) if edge_backbone is not None else None
        )
        # None: the plain weighted mean; the ServerApp passes the run config's bounds
        self.influence = influence or InfluenceBound(norm_factor=0.0, weight_factor=0.0)
        self.acceptance = acceptance  # None: every step that passes the reply checks applies
        self.max_failed_rounds = max_failed_rounds  # 0: never stop for failing replies
        self.compression = compression  # None: float32 uploads
        self.failing: tuple[str, int] | None = None  # (the shared reason, rounds in a row)
        self.secure_round: SecureRound | None = None
        self.keyed_round: KeyedRound | None = None  # shared keys for the next round
        self.train_messages: list[Message] = []
        self.velocity: NamedArrays | None = None
        self.current_arrays: NamedArrays = {}
        self.current_round = 0  # the absolute round the current arrays were sent for
        self.current_digest = ""  # their model_digest, which tagged replies must match
        self.report = RoundReport()

    def absolute_round(self, server_round: int) -> int:
        return self.rounds_done + server_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = from_array_record(arrays)
        self.current_digest = model_digest(self.current_arrays)
        self.report = RoundReport()
        self.wait_for_nodes(grid)
        config[REPLY_KEY] = "update"
        config[MAX_EXAMPLES_KEY] = self.max_num_examples
        if self.compression is not None:
            config.update(encoding_config(self.compression))
        self.add_edge_backbone(config, self.current_arrays)
        absolute = self.current_round = self.absolute_round(server_round)
        messages = list(super().configure_train(absolute, arrays, config, grid))
        self.report.num_sampled = len(messages)
        # Every message shares `config`, so settings written now still reach all of them.
        if self.privacy is not None and messages:
            if self.secagg is not None:
                self.privacy.provision(self.secagg.shape(len(messages))[1])
            self.privacy.start_round(absolute, len(messages), len(list(grid.get_node_ids())))
            for key, value in self.privacy.client_config().items():
                config[key] = value
        elif self.secagg is not None:
            config[CLIP_KEY] = self.secagg.clip_norm
        self.secure_round = None
        if self.secagg is not None and messages:
            messages = self.open_secure_round(grid, messages)
        self.train_messages = messages
        return messages

    def wait_for_nodes(self, grid: Grid) -> None:
        """Block until `min_available_nodes` are online.

        Flower's FedAvg sizes its sample from the nodes online *before* it waits, so
        a node that (re)joins during the wait would miss the round that waited for it.
        """
        while len(online := list(grid.get_node_ids())) < self.min_available_nodes:
            log(
                INFO,
                "Waiting for nodes: %s online, min-available-nodes=%s",
                len(online),
                self.min_available_nodes,
            )
            time.sleep(1)

    def open_secure_round(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Key exchange before training; an abort skips the round (model unchanged)."""
        assert self.secagg is not None
        clip_range, max_weight = self.secagg.encoding(self.privacy)
        # Keys shared ahead serve only a next round with the same clients: with sampling
        # (fraction-train < 1) that almost never happens, and the work would be wasted.
        secure_round = SecureRound(
            grid,
            self.secagg.timeout,
            self.secagg.shape,
            self.keyed_round,
            share_ahead=self.fraction_train >= 1.0,
        )
        self.keyed_round = None  # used up, whether the round completes or not
        try:
            messages = secure_round.open(
                messages,
                sum(value.size for value in self.current_arrays.values()),
                clip_range,
                max_weight,
            )
        except SecAggAbort as abort:
            log(WARNING, "SecAgg round aborted before training: %s", abort)
            return []
        self.secure_round = secure_round
        return messages

    def add_edge_backbone(self, config: ConfigRecord, arrays: NamedArrays) -> None:
        """Edge clients train only the head, on features of the current global backbone."""
        if self.edge_backbone is not None:
            config[BACKBONE_KEY] = self.edge_backbone(arrays)

    def checked_update(self, reply: Message) -> tuple[CheckedReply | None, str | None]:
        """The reply if it passes the gate (and, under DP, the clip check), else why not."""
        checked, reason = check_reply(
            reply,
            self.current_arrays,
            server_round=self.current_round,
            digest=self.current_digest,
            max_num_examples=self.max_num_examples,
            partial_names=self.partial_names,
            encoding=self.compression,
        )
        if checked is not None and checked.update is not None and self.privacy is not None:
            reason = self.privacy.clip_violation(checked.update)
        return (checked, None) if reason is None else (None, reason)

    def secure_tag_violations(self, replies: list[Message]) -> dict[int, str]:
        """The nodes whose masked upload is not tagged as this round's update, with why."""
        sent = destinations(self.train_messages)
        refused = {}
        for reply in replies:
            if reply.has_error():
                continue  # the protocol books it as a dropout
            reason = masked_upload_reason(reply.content, self.current_round, self.current_digest)
            if reason is not None:
                refused[replying_node(reply, sent)] = reason
        return refused

    @staticmethod
    def origin_violation(
        reply: Message, node: int, sent: Mapping[str, int], sampled: set[int]
    ) -> str | None:
        """Why `reply` is not an answer from a node this round sampled, or None."""
        if sent and reply.metadata.reply_to_message_id not in sent:
            return "it answers no training message of this round"
        if node not in sampled:
            return "the node was not sampled this round"
        if not reply.has_error() and reply.metadata.src_node_id != node:
            return f"sent by node {reply.metadata.src_node_id}, not the node asked"
        return None

    def accepted_replies(self, replies: Iterable[Message]) -> list[Accepted]:
        """Replies that pass the gate; the others are logged and counted with their reason.

        Only sampled nodes may answer, once: every reply of a node that answers
        twice is dropped (keeping the first would let arrival order pick which of
        two different updates counts). A client past its local privacy budget
        declines: that is counted, not rejected.
        """
        replies = list(replies)
        sent = destinations(self.train_messages)
        sampled = {message.metadata.dst_node_id for message in self.train_messages}
        nodes = [replying_node(reply, sent) for reply in replies]
        answers = Counter(nodes)
        accepted = []
        for reply, node in zip(replies, nodes, strict=True):
            reason = self.origin_violation(reply, node, sent, sampled)
            if reason is None and answers[node] > 1:
                reason = f"{answers[node]} replies from one node; all are dropped"
            checked = None
            if reason is None:
                checked, reason = self.checked_update(reply)
            if checked is None:
                self.report.rejected[node] = reason or "rejected"
                log(WARNING, "Dropped reply from node %s: %s", node, reason)
                continue
            if LOCAL_EPSILON_KEY in checked.metrics:
                self.report.client_epsilons.append(float(checked.metrics[LOCAL_EPSILON_KEY]))
            if checked.update is None:
                self.report.num_declined += 1
                log(INFO, "Node %s declined to train: its local privacy budget is spent", node)
                continue
            content = RecordDict({"metrics": checked.metrics})
            accepted.append(Accepted(content, checked.update, checked.metrics))
        self.report.num_replies = len(accepted)
        self.report.num_rejected = len(self.report.rejected)
        return accepted

    def skip(self, server_round: int, reason: str) -> None:
        """Keep the global model for this round; the log and metrics.jsonl say why."""
        self.report.skip_reason = reason
        log(
            WARNING,
            "Round %s: %s; the global model stays unchanged",
            self.absolute_round(server_round),
            reason,
        )

    def enough(self, server_round: int, count: int) -> bool:
        """Whether `count` contributions may be aggregated; logs why not."""
        if count >= max(self.min_train_nodes, 1):
            return True
        self.skip(
            server_round,
            f"{count} valid updates, fewer than min-train-nodes={self.min_train_nodes}",
        )
        return False

    def step(self, server_round: int, mean_update: NamedArrays) -> ArrayRecord | None:
        """The new global model from this round's mean update, or None if the acceptance
        check refuses it: then the model and the momentum stay as they were (a DP round
        is already in the ledger: its noise was drawn and its sum seen)."""
        new_arrays, velocity = apply_update(
            self.current_arrays, mean_update, self.server_lr, self.server_momentum, self.velocity
        )
        if self.acceptance is not None:
            problem, self.report.accept_loss = self.acceptance.problem(
                self.current_arrays, new_arrays
            )
            if problem is not None:
                self.skip(server_round, f"step refused: {problem}")
                return None
        self.velocity = velocity
        self.report.aggregated = True
        return to_array_record(new_arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = self.aggregate_round(server_round, replies)
        self.stop_if_failing(server_round)
        return result

    def stop_if_failing(self, server_round: int) -> None:
        """Raise `RunFailing` once every reply failed for one reason in too many rounds.

        A broken setup (a data plan that cannot work, a crashing ClientApp) then ends
        the run with its reason instead of spinning through every round.
        """
        reasons = set(self.report.rejected.values())
        if self.report.aggregated or self.report.num_replies or len(reasons) != 1:
            self.failing = None
            return
        (reason,) = reasons
        streak = self.failing[1] + 1 if self.failing and self.failing[0] == reason else 1
        self.failing = (reason, streak)
        if self.max_failed_rounds and streak >= self.max_failed_rounds:
            raise RunFailing(
                f"every reply failed in {streak} rounds in a row (up to round "
                f"{self.absolute_round(server_round)}, max-failed-rounds="
                f"{self.max_failed_rounds}): {reason}"
            )

    def aggregate_round(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """This round's new model and metrics, or (None, None) if it must not change."""
        if self.secure_round is not None:
            return self.aggregate_secure(server_round, replies), None
        accepted = self.accepted_replies(replies)
        if not self.enough(server_round, len(accepted)):
            return None, None
        arrays = self.step(
            server_round, self.mean_update(self.absolute_round(server_round), accepted)
        )
        metrics = aggregate_metricrecords([reply.content for reply in accepted], WEIGHT_KEY)
        loss = metrics.get("train-loss")
        self.report.train_loss = float(loss) if isinstance(loss, (int, float)) else None
        if arrays is None:  # refused: the round's train-loss stays in the report only
            return None, None
        log(INFO, "Aggregated %s updates (%s rejected)", len(accepted), self.report.num_rejected)
        return arrays, metrics

    def aggregate_secure(self, server_round: int, replies: Iterable[Message]) -> ArrayRecord | None:
        """Unmask the sum Σ n_k·Δ_k; no per-client update or metric is ever seen."""
        assert self.secure_round is not None
        replies = list(replies)
        refused = self.secure_tag_violations(replies)
        for node, reason in refused.items():
            log(WARNING, "Dropped reply from node %s: %s", node, reason)
        sent = destinations(self.train_messages)
        replies = [reply for reply in replies if replying_node(reply, sent) not in refused]
        try:
            result = self.secure_round.close(replies, sent)
        except SecAggAbort as abort:
            self.skip(server_round, f"SecAgg round aborted: {abort}")
            self.report.rejected = {**self.secure_round.failures, **refused}
            self.report.num_rejected = len(self.report.rejected)
            return None
        finally:
            self.keyed_round = self.secure_round.next_round
        self.report.num_replies = result.num_clients
        # A node's own error, or its refused tag, says more than "no masked input" does
        self.report.rejected = {**result.dropped, **self.secure_round.failures, **refused}
        self.report.num_rejected = len(self.report.rejected)
        if not self.enough(server_round, result.num_clients):
            return None
        problem = self.secure_bounds().problem(
            result.weighted_sum, result.total_weight, result.num_clients
        )
        if problem is not None:
            self.skip(server_round, f"SecAgg sum refused: {problem}")
            return None
        total = unflatten(result.weighted_sum, self.current_arrays)
        if self.privacy is not None:
            mean = self.private_mean(
                self.absolute_round(server_round), total, result.num_clients, 0
            )
        else:  # Σn_k lies in [m, m·W], checked above
            mean = {name: value / result.total_weight for name, value in total.items()}
        return self.step(server_round, mean)

    def secure_bounds(self) -> SecureBounds:
        """The honest range of this round's SecAgg sum (clip norm C, weights, noise)."""
        assert self.secagg is not None and self.secure_round is not None
        assert self.secure_round.server is not None
        quantizer = self.secure_round.server.params.quantizer
        private = self.privacy is not None
        return SecureBounds(
            clip_norm=self.privacy.clip_norm if self.privacy else self.secagg.clip_norm,
            max_weight=quantizer.max_weight,
            equal_weights=private,
            error_bound=quantizer.error_bound,
            honest_limit=quantizer.honest_limit,
            noise_stddev=self.privacy.client_noise_stddev() if self.privacy else 0.0,
        )

    def mean_update(self, server_round: int, accepted: list[Accepted]) -> NamedArrays:
        """Σ(n_k/n)Δ_k with each client's influence bounded (see `InfluenceBound`);
        under DP the noised equal-weight sum over the sampled count (the clip check
        already bounds each client, and DP's sensitivity analysis needs equal weights)."""
        updates = [reply.update for reply in accepted]
        metrics = [reply.metrics for reply in accepted]
        if self.privacy is None:
            return self.influence.aggregate(updates, [float(m[WEIGHT_KEY]) for m in metrics])
        unclipped = sum(int(m.get(UNCLIPPED_KEY, 0)) for m in metrics)
        # Zeros for every array: with only edge (head-only) updates the backbone still gets
        # its noise, or whether a torch client took part would show in the released model.
        zeros = {name: np.zeros(value.shape) for name, value in self.current_arrays.items()}
        total = summed([zeros, *updates])
        return self.private_mean(server_round, total, len(accepted), unclipped)

    def private_mean(
        self, server_round: int, total: NamedArrays, num_contributors: int, unclipped: int
    ) -> NamedArrays:
        """(Σ Δ_k + noise) / sampled count, and the round's ε in the ledger.

        Central mode adds the noise here; distributed mode's clients already did.
        """
        assert self.privacy is not None
        if self.privacy.mode == "central":
            total = self.privacy.central_noise(total)
        self.report.epsilon = self.privacy.finish_round(
            server_round, num_contributors, self.report.num_sampled, unclipped
        )
        return {name: value / self.report.num_sampled for name, value in total.items()}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.add_edge_backbone(config, from_array_record(arrays))
        if self.fraction_evaluate > 0:  # otherwise no messages, and nothing to wait for
            self.wait_for_nodes(grid)
        return super().configure_evaluate(self.absolute_round(server_round), arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The example-weighted mean of the valid evaluate replies (one per node).

        Metrics are reported, not trained on, yet they reach metrics.jsonl, the plots
        and the trackers: each reply passes its own gate (known keys, in range).
        """
        replies = list(replies)
        answers = Counter(reply.metadata.src_node_id for reply in replies)
        clean = []
        for reply in replies:
            node = reply.metadata.src_node_id
            metrics, reason = checked_evaluation(reply, self.max_num_examples)
            if answers[node] > 1:
                metrics, reason = None, f"{answers[node]} evaluate replies from one node"
            if metrics is None:
                log(WARNING, "Dropped evaluate reply from node %s: %s", node, reason)
                continue
            clean.append(RecordDict({"metrics": metrics}))
        if not clean:
            return None
        aggregated = aggregate_metricrecords(clean, WEIGHT_KEY)
        self.report.val_metrics = {
            k: float(v) for k, v in aggregated.items() if isinstance(v, (int, float))
        }
        return aggregated
