import pytest

from eventrails import _naming
from eventrails._durations import format_duration, parse_duration
from eventrails._settings import WorkerSettings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("1h30m", 5400), ("7d", 604800), ("250ms", 0.25), ("1.5s", 1.5), ("2m", 120)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "7 days", "1w", "-1s", "s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0.25, 1, 90, 3600, 86400 * 14, 1.5])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_derived_names() -> None:
    assert _naming.stream_name("shop", "orders") == "shop_orders"
    assert _naming.dead_letter_stream_name("shop", "orders") == "shop_orders_dlq"
    assert _naming.subject("eventrails", "shop", "orders", "send-email") == "eventrails.shop.orders.send-email"
    assert _naming.dead_letter_subject("eventrails", "shop", "orders", "send-email") == "eventrails.dlq.shop.orders.send-email"
    assert _naming.schedule_subject("er", "shop", "orders", "send-email", "user.42 x") == "er.sched.shop.orders.send-email.user_42_x"


def test_worker_settings_env_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = WorkerSettings(
        nats_servers=["nats://a:4222", "nats://b:4222"], handler="app.w:worker", topic="jobs",
        consumer="mailer", backoff=[1.0, 2.5, 60.0], namespace="shop",
    )
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    assert WorkerSettings() == settings


def test_worker_settings_backoff_accepts_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTRAILS_BACKOFF", "1s,1m")
    assert WorkerSettings().backoff == [1.0, 60.0]
