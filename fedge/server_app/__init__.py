"""fedge ServerApp: our FedAvg with validation, checkpoints and per-round outputs."""

from fedge.server_app.app import app

__all__ = ["app"]
