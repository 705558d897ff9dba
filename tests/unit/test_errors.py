"""Every nats-py error class translates to a deliberate eventrails error type.

The table below names the eventrails type for each nats-py exception class. A class that
nats-py adds later makes ``test_translate_covers_every_class`` fail until someone
decides where it belongs, instead of it silently falling through to the generic NatsError.
"""

from __future__ import annotations

import asyncio
import inspect
from types import ModuleType

import nats.errors
import nats.js.errors
import pytest

from eventrails._errors import (
    ConfigurationError,
    EventrailsError,
    JetStreamNotFound,
    JetStreamRejected,
    NatsError,
    NatsUnavailable,
    PayloadError,
    is_temporary,
    translate,
)

E = nats.errors
JS = nats.js.errors

EXPECTED: dict[type[BaseException], type[EventrailsError]] = {
    # The server or the route to it is briefly unavailable: the same call may succeed later.
    E.TimeoutError: NatsUnavailable,
    E.FlushTimeoutError: NatsUnavailable,
    E.DrainTimeoutError: NatsUnavailable,
    E.NoRespondersError: NatsUnavailable,
    E.StaleConnectionError: NatsUnavailable,
    E.UnexpectedEOF: NatsUnavailable,
    E.OutboundBufferLimitError: NatsUnavailable,
    E.ConnectionClosedError: NatsUnavailable,
    E.ConnectionDrainingError: NatsUnavailable,
    E.ConnectionReconnectingError: NatsUnavailable,
    E.NoServersError: NatsUnavailable,
    JS.ServiceUnavailableError: NatsUnavailable,
    JS.NoStreamResponseError: NatsUnavailable,
    JS.TooManyStalledMsgsError: NatsUnavailable,
    JS.FetchTimeoutError: NatsUnavailable,
    # Credentials or TLS settings are wrong: retrying unchanged cannot help.
    E.AuthorizationError: ConfigurationError,
    E.InvalidUserCredentialsError: ConfigurationError,
    E.SecureConnRequiredError: ConfigurationError,
    E.SecureConnWantedError: ConfigurationError,
    E.SecureConnFailedError: ConfigurationError,
    # The message itself is the problem.
    E.MaxPayloadError: PayloadError,
    # JetStream replied "not found".
    JS.NotFoundError: JetStreamNotFound,
    JS.BucketNotFoundError: JetStreamNotFound,
    JS.KeyDeletedError: JetStreamNotFound,
    JS.KeyNotFoundError: JetStreamNotFound,
    JS.ObjectNotFoundError: JetStreamNotFound,
    JS.ObjectDeletedError: JetStreamNotFound,
    # JetStream rejected the request; the error codes travel with it.
    JS.APIError: JetStreamRejected,
    JS.ServerError: JetStreamRejected,
    JS.BadRequestError: JetStreamRejected,
    JS.ConsumerInvalidResetError: JetStreamRejected,
    JS.BadBucketError: JetStreamRejected,
    JS.KeyValueError: JetStreamRejected,
    JS.KeyWrongLastSequenceError: JetStreamRejected,
    JS.NoKeysError: JetStreamRejected,
    JS.KeyHistoryTooLargeError: JetStreamRejected,
    # Client-side misuse or features eventrails does not use: the generic NATS error is right.
    E.Error: NatsError,
    E.BadSubscriptionError: NatsError,
    E.BadSubjectError: NatsError,
    E.BadHeaderError: NatsError,
    E.SlowConsumerError: NatsError,
    E.BadTimeoutError: NatsError,
    E.JsonParseError: NatsError,
    E.InvalidCallbackTypeError: NatsError,
    E.ProtocolError: NatsError,
    E.ServerNotInPoolError: NatsError,
    E.NotJSMessageError: NatsError,
    E.MsgAlreadyAckdError: NatsError,
    JS.Error: NatsError,
    JS.ConsumerSequenceMismatchError: NatsError,
    JS.InvalidKeyError: NatsError,
    JS.InvalidBucketNameError: NatsError,
    JS.InvalidObjectNameError: NatsError,
    JS.BadObjectMetaError: NatsError,
    JS.LinkIsABucketError: NatsError,
    JS.DigestMismatchError: NatsError,
    JS.ObjectAlreadyExists: NatsError,
    JS.KeyValueLimitMarkerTTLNotSupportedError: NatsError,
}


def _error_classes(module: ModuleType) -> list[type[BaseException]]:
    return [
        value for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__
    ]


ALL_NATS_ERRORS = sorted(
    {*_error_classes(nats.errors), *_error_classes(nats.js.errors)}, key=lambda cls: (cls.__module__, cls.__name__)
)


def _instance(cls: type[BaseException]) -> BaseException:
    if cls is E.SlowConsumerError:
        return cls(subject="a.b", reply="", sid=1, sub=None)  # type: ignore[arg-type]
    if cls is JS.ConsumerSequenceMismatchError:
        return cls(stream_resume_sequence=1, consumer_sequence=2, last_consumer_sequence=1)
    if issubclass(cls, JS.APIError) and cls not in (JS.KeyDeletedError, JS.KeyNotFoundError, JS.KeyWrongLastSequenceError):
        return cls(code=400, err_code=10001, description="rejected for the test")
    return cls()


def test_translate_covers_every_class() -> None:
    unmapped = [f"{cls.__module__}.{cls.__name__}" for cls in ALL_NATS_ERRORS if cls not in EXPECTED]
    assert not unmapped, f"decide which eventrails error these translate to and add them to EXPECTED: {unmapped}"


@pytest.mark.parametrize("cls", ALL_NATS_ERRORS, ids=lambda cls: f"{cls.__module__.split('.')[-2]}.{cls.__name__}")
def test_translate_nats_error(cls: type[BaseException]) -> None:
    expected = EXPECTED.get(cls)
    if expected is None:
        pytest.fail(f"{cls.__name__} has no expected mapping")
    error = _instance(cls)

    translated = translate(error, "publish send-email to eventrails.shop.orders.send-email")

    assert type(translated) is expected, f"{cls.__name__} became {type(translated).__name__}, expected {expected.__name__}"
    assert str(translated).startswith("publish send-email to eventrails.shop.orders.send-email")
    assert is_temporary(translated) == (expected is NatsUnavailable)


def test_translate_keeps_error_codes() -> None:
    error = JS.BadRequestError(code=400, err_code=10058, description="stream name already in use")

    translated = translate(error, "create stream shop_orders")

    assert isinstance(translated, JetStreamRejected)
    assert (translated.code, translated.err_code) == (400, 10058)
    assert "stream name already in use" in str(translated)
    assert "10058" in str(translated)


def test_translate_not_found_code() -> None:
    translated = translate(JS.NotFoundError(code=404, err_code=10014, description="consumer not found"), "bind")

    assert isinstance(translated, JetStreamNotFound)
    assert translated.err_code == 10014
    assert "consumer not found" in str(translated)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncio.TimeoutError(), NatsUnavailable),
        (ConnectionRefusedError(111, "Connection refused"), NatsUnavailable),
        (ValueError("odd"), NatsError),
    ],
    ids=["asyncio-timeout", "connection-refused", "other"],
)
def test_translate_other_errors(error: BaseException, expected: type[EventrailsError]) -> None:
    assert type(translate(error, "fetch")) is expected


def test_translate_passes_own_errors() -> None:
    original = PayloadError("payload of 'send-email' lacks 'projectId'")

    assert translate(original, "publish") is original


@pytest.mark.parametrize(
    ("err_code", "advice"),
    [(10188, "set spec.delayedDelivery: true on the Topic"), (10190, "apply the Topic again")],
    ids=["schedules-disabled", "schedule-target-invalid"],
)
def test_translate_schedule_rejections(err_code: int, advice: str) -> None:
    error = JS.BadRequestError(code=400, err_code=err_code, description="message schedules refused")

    translated = translate(error, "schedule send-email")

    assert isinstance(translated, ConfigurationError)
    assert str(translated).startswith("schedule send-email: ")
    assert advice in str(translated)
    assert str(err_code) in str(translated)
