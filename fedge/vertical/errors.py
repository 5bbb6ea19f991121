"""The one error a vertical run raises for bad input or a misbehaving peer."""


class VerticalError(ValueError):
    """Bad vertical input or a peer message that broke the protocol; says what to fix."""
