"""Keys the ServerApp and ClientApps agree on (torch-free, shared by edge clients)."""

from collections.abc import Mapping

REPLY_KEY = "fedge-reply"
"""Train-config key: 'update' asks for Δw (fedge's strategy); absent means full
weights, so fedge's ClientApp also serves Flower's stock strategies."""

EDGE_NODE_KEY = "edge"
"""Node-config flag (`--node-config "edge=true"`): this SuperNode runs the
torch-free edge learner instead of PyTorch training."""

LOCAL_DATA_KEY = "local-data"
"""Node-config path (edge nodes): this node's own IDX folder, CSV or .npz, read with
numpy alone and used whole, so the node needs no partitioner (`fedge[edge]`)."""

CLIP_KEY = "dp-clip"
"""Train-config key: the L2 norm clients clip their update to (DP modes)."""

NOISE_MULTIPLIER_KEY = "dp-noise-multiplier"
MIN_CLIENTS_KEY = "dp-min-clients"
"""Train-config keys (distributed DP): each client adds N(0, σ²C²/m_min) itself."""

UNCLIPPED_KEY = "dp-unclipped"
"""Reply metric: 1 if the update norm was within the clip norm (adaptive clipping)."""

LOCAL_EPSILON_KEY = "local-epsilon"
DECLINED_KEY = "declined"
"""Reply metrics (local DP-SGD): the node's ε so far; 1 if it declined to train."""

WEIGHT_KEY = "num-examples"
"""Reply metric: the examples behind an update (its aggregation weight)."""

MAX_EXAMPLES_KEY = "max-num-examples"
"""Train-config key: the public cap on `num-examples`. Honest clients report
min(n, cap); the server rejects a reply above it (plain and SecAgg alike)."""

LOSS_KEY = "train-loss"
"""Reply metric: the mean local training loss."""

UPDATE_INFO_KEY = "update-info"
PARTIAL_KEY = "partial-update"
"""Reply ConfigRecord and flag: the update covers only some arrays (e.g. an edge
client's classifier head); the others are left to the clients that sent them."""


def reported_examples(num_examples: int, train_config: Mapping[str, object]) -> int:
    """The weight a client reports: its example count, capped as the server asks.

    A config without a valid cap (a stock Flower strategy) leaves the count as is.
    """
    cap = train_config.get(MAX_EXAMPLES_KEY)
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
        return min(num_examples, cap)
    return num_examples
