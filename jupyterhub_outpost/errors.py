"""Exceptions that become HTTP answers, and the protocol's start-failure body."""

import traceback

from .log import secrets


class OutpostError(Exception):
    """An error with an HTTP status and a message a user can act on"""

    status_code = 500

    def __init__(self, message="", status_code=None):
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class ServerNotFoundError(OutpostError):
    status_code = 404

    def __init__(self, message="No such server"):
        super().__init__(message)


class ServerExistsError(OutpostError):
    status_code = 409


class ServerBusyError(OutpostError):
    status_code = 409


class StatusUnknownError(OutpostError):
    """Poll could not tell: the hub must keep the server (5xx, not a status)"""

    status_code = 503


class StopFailedError(OutpostError):
    """The Spawner's stop() failed or timed out: the server may still run,
    stays recorded, and can be stopped again"""

    status_code = 503


class DatabaseUnavailableError(OutpostError):
    status_code = 503


class StartFailedError(OutpostError):
    """A start failed; answered with status 419 in the protocol's shape.

    ``original`` is the exception the Spawner (or a hook) raised.
    """

    status_code = 419

    def __init__(self, original):
        super().__init__(str(original))
        self.original = original


class OverrideRefusedError(OutpostError):
    """The operator's ``allow_override`` hook refused a start's ``misc``"""

    status_code = 419


class AccountRefusedError(OutpostError):
    """A start would run as an account the Outpost's policy refuses"""

    status_code = 419


class StartCancelledError(OutpostError):
    """A stop request cancelled the start"""

    status_code = 419


def _safe(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return secrets.scrub(value) if isinstance(value, str) else value
    return secrets.scrub(repr(value))


def start_failure_body(e):
    """The 419 body the OutpostSpawner shows: module, class, args, traceback.

    Secrets (registered tokens, PEM blocks, values of secret-named keys) are
    scrubbed from every text; env and certificates are never included.
    """
    original = getattr(e, "original", e)
    cls = type(original)
    return {
        "module": cls.__module__,
        "class": cls.__name__,
        # str() of the exception says most (an OSError's args lack the file name)
        "args": [_safe(str(original) or cls.__name__)],
        "kwargs": {},
        "traceback": secrets.scrub(
            "".join(traceback.format_exception(cls, original, original.__traceback__))
        ),
    }
