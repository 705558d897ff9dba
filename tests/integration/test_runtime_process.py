"""``eventrails worker module:object`` as a real process, with the environment a worker Deployment gets.

The module-level ``worker`` below is the handler object those processes import.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrails import Context, Worker
from eventrails._health import HealthServer
from eventrails._metrics import Metrics
from eventrails._natsserver import free_port
from tests.integration.test_runtime import (
    WAIT,
    Rails,
    SendEmail,
    consumer_resource,
    email,
    eventually,
    rails,
    topic_resource,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EVENTRAILS = str(Path(sys.executable).parent / "eventrails")
HANDLER = "tests.integration.test_runtime_process:worker"

worker = Worker()


@worker.task("send-email")
async def send_email(payload: SendEmail, ctx: Context) -> None:
    # Downstream work keyed by this message, so a redelivery does not enqueue it twice.
    await ctx.publisher.enqueue(
        "orders", "refresh-cache", {"cacheKey": f"email-{payload.emailId}"}, dedupe_key=f"{ctx.msg_id}-refresh"
    )


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as response:
            return response.status, await response.text()


async def test_worker_process_handles_and_stops(rails: Rails, tmp_path: Path) -> None:
    topic = topic_resource()
    consumer = consumer_resource(names=["send-email"], handler=HANDLER)
    await rails.apply_topic(topic)
    port = free_port()
    settings = await rails.apply_consumer(consumer, topic, health_port=port)
    env = {**os.environ, **settings.to_env()}
    log_path = tmp_path / "worker.log"

    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            EVENTRAILS, "worker", HANDLER, cwd=ROOT, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async def ready() -> bool:
            if process.returncode is not None:
                pytest.fail(f"worker exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                return (await _get(port, "/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, "the worker's /readyz to answer 200", timeout=30)
        assert await _get(port, "/healthz") == (200, "ok\n")

        receipt = await rails.publisher().enqueue("orders", "send-email", email(77))
        announced = await rails.outcomes.next()
        assert (announced["outcome"], announced["msgId"]) == ("done", receipt.msg_id)

        downstream = await rails.js.get_last_msg("shop_orders", "eventrails.shop.orders.refresh-cache")
        assert (downstream.headers or {})["Nats-Msg-Id"] == f"{receipt.msg_id}-refresh"
        status, metrics = await _get(port, "/metrics")
        assert status == 200
        assert 'eventrails_outcomes_total{name="send-email",outcome="done",topic="orders"} 1.0' in metrics
        assert 'eventrails_messages_received_total{name="send-email",topic="orders"} 1.0' in metrics

        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), WAIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    output = log_path.read_text()
    assert returncode == 0, output
    assert "SIGTERM received: draining and exiting" in output
    assert "exited cleanly" in output


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("tests.integration.no_such_module:worker", "module 'tests.integration.no_such_module' not found"),
        ("tests.integration.test_runtime_process:send_email", "is a function, not an eventrails Worker"),
    ],
    ids=["missing-module", "not-a-worker"],
)
async def test_worker_process_bad_handler(handler: str, message: str) -> None:
    env: dict[str, Any] = {**os.environ, "EVENTRAILS_TOPIC": "orders", "EVENTRAILS_CONSUMER": "orders-worker"}
    process = await asyncio.create_subprocess_exec(
        EVENTRAILS, "worker", handler, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), WAIT)

    assert process.returncode == 2
    assert message in output.decode()


async def test_health_readiness_reason() -> None:
    state = {"ready": False, "detail": "consumer orders-worker on stream shop_orders does not exist"}
    metrics = Metrics()
    health = HealthServer("127.0.0.1", 0, lambda: (bool(state["ready"]), str(state["detail"])), metrics)
    await health.start()
    try:
        assert health.port
        assert await _get(health.port, "/healthz") == (200, "ok\n")
        assert await _get(health.port, "/readyz") == (503, f"{state['detail']}\n")

        state.update(ready=True, detail="consuming orders-worker on stream shop_orders")
        metrics.ready.set(1)

        assert await _get(health.port, "/readyz") == (200, "consuming orders-worker on stream shop_orders\n")
        status, page = await _get(health.port, "/metrics")
        assert status == 200
        assert "eventrails_ready 1.0" in page
    finally:
        await health.stop()
