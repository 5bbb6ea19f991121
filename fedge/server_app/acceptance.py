"""The server's acceptance check: a round's candidate model must not raise the loss on
server-held public data by more than a tolerance (cf. Zeno, FLTrust's root dataset).

Under SecAgg+ the server sees only the sum, and an update inside the sum checks
(`SecureBounds`) can still take the model anywhere its weight share allows. What the
server can still judge is the *result*: before a step is applied, the current and the
candidate global model are scored on an acceptance slice of the held-out split, and a
step that raises the mean cross-entropy by more than `accept-tolerance` is refused
(`FedgeAvg.skip`: the model and the momentum stay as they were, the reason is logged
and written to metrics.jsonl). It judges the model, not the updates, so one rule covers
plain and SecAgg+ rounds alike; under DP (`FedgeConfig.acceptance_on`) it is off unless
asked for, since the noise alone can raise the loss more than any useful tolerance.

What it does not stop: poisoning that raises the acceptance loss by less than the
tolerance per round (slow drift, or a backdoor that leaves the public data's loss
alone), and any attack the acceptance data does not represent (it is the server's
public data, not the clients'). Repeated refusals are a denial of service the
attacker chooses; the log names every refused round.

The held-out split is divided once, by seed, into the acceptance slice and the test
set the recorder reports: the reported test accuracy stays an independent
measurement of models the check never saw the labels of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedge.data import DatasetBundle
from fedge.models import ModelSpec, build_model, load_numpy_state
from fedge.models.training import evaluate
from fedge.records import NamedArrays

ACCEPT_SHARE = 1 / 3
"""Share of the held-out split the acceptance check uses (digits: 120 of 360)."""
ACCEPT_MAX = 500
"""At most this many examples: two evaluations per round stay cheap on any dataset."""


@dataclass(frozen=True)
class HeldOut:
    """The held-out split, divided into the acceptance slice and the reported test set."""

    x_accept: np.ndarray
    y_accept: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @classmethod
    def of(cls, bundle: DatasetBundle, seed: int) -> HeldOut:
        """A seeded, disjoint split: the one rule for which held-out rows do what."""
        order = np.random.default_rng(seed).permutation(len(bundle.y_test))
        size = min(ACCEPT_MAX, int(len(order) * ACCEPT_SHARE))
        accept, test = order[:size], order[size:]
        return cls(
            bundle.x_test[accept], bundle.y_test[accept], bundle.x_test[test], bundle.y_test[test]
        )


class AcceptanceCheck:
    """Refuses a candidate model whose acceptance loss exceeds the current one + tolerance."""

    def __init__(self, spec: ModelSpec, held_out: HeldOut, tolerance: float) -> None:
        if not tolerance > 0:
            raise ValueError(
                f"tolerance must be > 0, got {tolerance}; turn the check off with "
                "accept-check='off' instead"
            )
        if len(held_out.y_accept) == 0:
            raise ValueError("the acceptance slice is empty: the held-out split is too small")
        self.model = build_model(spec)
        self.x = held_out.x_accept
        self.y = held_out.y_accept
        self.tolerance = tolerance

    def loss(self, arrays: NamedArrays) -> float:
        load_numpy_state(self.model, arrays)
        return evaluate(self.model, self.x, self.y)[0]

    def problem(self, current: NamedArrays, candidate: NamedArrays) -> tuple[str | None, float]:
        """Why `candidate` must not replace `current` (None if it may), and its loss.

        A non-finite candidate loss is refused (fail closed); a non-finite current loss
        accepts any finite candidate, since nothing could be worse.
        """
        before, after = self.loss(current), self.loss(candidate)
        if math.isfinite(after) and (not math.isfinite(before) or after <= before + self.tolerance):
            return None, after
        return (
            f"acceptance loss would rise from {before:.4g} to {after:.4g} "
            f"(more than accept-tolerance={self.tolerance:g}) on {len(self.y)} server-held "
            "examples",
            after,
        )
