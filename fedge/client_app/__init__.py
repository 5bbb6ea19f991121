"""fedge ClientApp: local PyTorch training on this node's partition."""

from fedge.client_app.app import app

__all__ = ["app"]
