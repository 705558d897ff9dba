"""The exceptions eventrails raises, and the one place that translates nats-py errors into them.

    EventrailsError
    ├── PayloadError              a payload breaks the topic's contract (never retried)
    ├── ConfigurationError        settings or a handler reference are invalid
    └── NatsError                 a NATS or JetStream operation failed
        ├── NatsUnavailable       temporary: timeout, no responders, 503, connection lost
        ├── JetStreamNotFound     the stream or consumer does not exist
        └── JetStreamRejected     the server rejected the request (carries the error codes)
            └── ...

Callers catch these types, never the nats-py ones; ``translate`` keeps the original as
``__cause__``.
"""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors


class EventrailsError(Exception):
    """Base class of every error eventrails raises."""


class PayloadError(EventrailsError, ValueError):
    """A payload is not a JSON object, lacks a required key, or fails its model."""


class ConfigurationError(EventrailsError):
    """Settings, a manifest or a handler reference are invalid; the message names the fix."""


class NatsError(EventrailsError):
    """A NATS or JetStream operation failed."""


class NatsUnavailable(NatsError):
    """NATS did not answer in time or is reconnecting; the same call may succeed later."""


class JetStreamNotFound(NatsError):
    """The stream or consumer named in the request does not exist."""

    def __init__(self, message: str, err_code: int | None = None) -> None:
        super().__init__(message)
        self.err_code = err_code


class JetStreamRejected(NatsError):
    """The JetStream API rejected the request.

    ``code`` is the HTTP-like status and ``err_code`` the JetStream error code, such as
    10058 (stream name already in use with a different configuration).
    """

    def __init__(self, message: str, code: int | None = None, err_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.err_code = err_code
        self.description = message


# Errors after which the same request may succeed: the server or the route to it is
# briefly unavailable (including a 503 while a stream elects a new leader).
_TEMPORARY: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.TooManyStalledMsgsError,
    asyncio.TimeoutError,
    ConnectionError,
)


# Errors that mean the credentials or TLS settings are wrong: retrying unchanged cannot help.
_SETTINGS: tuple[type[BaseException], ...] = (
    nats.errors.AuthorizationError,
    nats.errors.InvalidUserCredentialsError,
    nats.errors.SecureConnRequiredError,
    nats.errors.SecureConnWantedError,
    nats.errors.SecureConnFailedError,
)


# JetStream error codes that mean the stream is not set up for what was asked.
_SCHEDULES_DISABLED = 10188  # a schedule was published to a stream without allow_msg_schedules
_SCHEDULE_TARGET_INVALID = 10190  # the schedule's target subject is not one of the stream's


def translate(error: BaseException, context: str) -> EventrailsError:
    """Return the eventrails error for a nats-py error; ``context`` says what was being done.

    The caller raises the result ``from error``. Errors that are already eventrails errors
    pass through unchanged.
    """
    if isinstance(error, EventrailsError):
        return error
    # Some APIError subclasses (the key-value ones) skip APIError.__init__, so read the
    # server's fields defensively.
    code = getattr(error, "code", None)
    err_code = getattr(error, "err_code", None)
    description = getattr(error, "description", None) or str(error)
    if isinstance(error, nats.js.errors.NotFoundError):
        return JetStreamNotFound(f"{context}: {description or 'not found'}", err_code=err_code)
    if isinstance(error, _SETTINGS):
        return ConfigurationError(f"{context}: {error}; check the EVENTRAILS_NATS_* credentials and TLS settings")
    if isinstance(error, nats.errors.MaxPayloadError):
        return PayloadError(f"{context}: the message exceeds the server's max_payload; send IDs, not documents")
    if isinstance(error, _TEMPORARY):
        detail = str(error) or type(error).__name__
        return NatsUnavailable(f"{context}: NATS is unavailable ({detail}); retry later")
    if isinstance(error, nats.js.errors.APIError) and err_code == _SCHEDULES_DISABLED:
        return ConfigurationError(
            f"{context}: the stream does not allow message schedules (err_code {err_code}); "
            "set spec.delayedDelivery: true on the Topic"
        )
    if isinstance(error, nats.js.errors.APIError) and err_code == _SCHEDULE_TARGET_INVALID:
        return ConfigurationError(
            f"{context}: the schedule's target subject is not in the stream (err_code {err_code}); "
            "apply the Topic again so its stream carries the task's subject"
        )
    if isinstance(error, nats.js.errors.APIError):
        return JetStreamRejected(
            f"{context}: {description or 'rejected'} (code {code}, err_code {err_code})",
            code=code,
            err_code=err_code,
        )
    if isinstance(error, nats.errors.Error):
        return NatsError(f"{context}: {type(error).__name__}: {error}")
    return NatsError(f"{context}: unexpected {type(error).__name__}: {error}")


def is_temporary(error: BaseException) -> bool:
    return isinstance(error, NatsUnavailable) or isinstance(error, _TEMPORARY)
