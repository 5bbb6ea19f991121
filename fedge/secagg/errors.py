"""Exceptions that tell a failed round apart from a misbehaving peer."""


class SecAggAbort(RuntimeError):
    """Too few clients remain to finish safely, so the round yields no aggregate.

    Raised by the server (and by a client guarding its own neighbourhood) instead
    of returning a partial or unverifiable sum.
    """


class ProtocolError(ValueError):
    """A message broke the protocol: wrong stage, type, size or authentication.

    The server turns it into "drop that client"; a client raises it to refuse a
    malformed server message.
    """
