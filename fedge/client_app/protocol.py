"""Keys the ServerApp and ClientApps agree on (torch-free, shared by edge clients)."""

REPLY_KEY = "fedge-reply"
"""Train-config key: 'update' asks for Δw (fedge's strategy); absent means full
weights, so fedge's ClientApp also serves Flower's stock strategies."""

EDGE_NODE_KEY = "edge"
"""Node-config flag (`--node-config "edge=true"`): this SuperNode runs the
torch-free edge learner instead of PyTorch training."""
