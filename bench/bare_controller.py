"""A Topic controller that does only the required work: the floor of the operator benchmark.

It lists and watches the Topics of one namespace, makes their streams with the
operator's own reconcile core, and merge-patches the status the operator would write.
Nothing else: no kopf, no finalizer, no Events, no indexes, no request pacing, no
retries and no resync. A Topic costs two API writes (the user's create and one status
patch), against four with the operator. The time this controller needs to bring N
Topics to Ready is therefore a floor for any Python controller doing the same JetStream
work on the same machine.

    python bench/bare_controller.py --nats nats://127.0.0.1:4222 --namespace bench

It reads the cluster from KUBECONFIG and prints "watching" once its first listing is done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

import aiohttp
import kopf
import nats

from eventrails._manifests import parse_resource
from eventrails._resources import Topic
from eventrails_operator import _kube, _reconcile
from eventrails_operator._desired import BusConnection


class BareController:
    """Watch, reconcile and status patch of the Topics in one namespace, up to ``limit`` at once."""

    def __init__(self, connection: kopf.ConnectionInfo, nats_url: str, namespace: str, limit: int) -> None:
        self.connection = connection
        self.kube = _kube.KubeApi(connection, connection_limit=limit)
        self.nats_url = nats_url
        self.namespace = namespace
        self.slots = asyncio.Semaphore(limit)
        self.tasks: set[asyncio.Task[None]] = set()
        self.bus = BusConnection(servers=(nats_url,))

    async def run(self) -> None:
        nc = await nats.connect(self.nats_url)
        self.jsm = nc.jsm()
        ssl_context = self.connection.as_ssl_context() if self.connection.server.startswith("https") else None
        session = aiohttp.ClientSession(
            base_url=self.connection.server.rstrip("/") + "/",
            headers={"Accept": "application/json", **self.connection.as_http_headers()},
            connector=aiohttp.TCPConnector(ssl=ssl_context or True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        path = _kube.TOPICS.path(self.namespace).lstrip("/")
        try:
            listing = await self.list_topics(session, path)
            print("watching", flush=True)
            version = listing["metadata"]["resourceVersion"]
            while True:
                params = {"watch": "true", "resourceVersion": version, "timeoutSeconds": "300"}
                async with session.get(path, params=params) as response:
                    response.raise_for_status()
                    async for line in response.content:
                        event = json.loads(line)
                        if event["type"] in ("ADDED", "MODIFIED"):
                            version = event["object"]["metadata"]["resourceVersion"]
                            self.consider(event["object"])
        finally:
            await session.close()
            await self.kube.close()
            await nc.close()

    async def list_topics(self, session: aiohttp.ClientSession, path: str) -> dict[str, Any]:
        """List the Topics and consider each, retrying while the API server returns 429.

        Right after the CRDs are installed, the API server returns 429 ("storage is
        (re)initializing") for a moment.
        """
        for _ in range(100):
            async with session.get(path) as response:
                if response.status == 429:
                    await asyncio.sleep(0.2)
                    continue
                response.raise_for_status()
                listing: dict[str, Any] = await response.json()
            for item in listing["items"]:
                self.consider(item)
            return listing
        raise RuntimeError("listing Topics failed: the API server returned 429 to every request for 20s")

    def consider(self, body: dict[str, Any]) -> None:
        """Start a reconcile of a Topic whose status does not yet reflect its generation."""
        status = body.get("status") or {}
        if status.get("observedGeneration") == body["metadata"].get("generation"):
            return
        task = asyncio.create_task(self.reconcile(body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def reconcile(self, body: dict[str, Any]) -> None:
        async with self.slots:
            raw = {key: value for key, value in body.items() if key != "status"}
            topic = parse_resource(raw, source="cluster")
            assert isinstance(topic, Topic)
            result = await _reconcile.reconcile_topic(self.jsm, topic, self.bus)
            if result.error is not None:
                print(f"Topic {topic.metadata.name}: {result.error}", file=sys.stderr, flush=True)
            await self.kube.merge_patch(_kube.TOPICS, topic.metadata.namespace, topic.metadata.name,
                                        {"status": result.status}, subresource="status")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", required=True, help="nats-server URL")
    parser.add_argument("--namespace", required=True, help="namespace whose Topics to reconcile")
    parser.add_argument("--limit", type=int, default=64, help="reconciles at once (default 64, like the operator)")
    arguments = parser.parse_args()
    connection = kopf.login_via_client(logger=logging.getLogger("bare-controller"), settings=kopf.OperatorSettings())
    if connection is None:
        print("no Kubernetes credentials in KUBECONFIG", file=sys.stderr)
        return 2
    controller = BareController(connection, arguments.nats, arguments.namespace, arguments.limit)
    runner = asyncio.create_task(controller.run())
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, runner.cancel)
    try:
        await runner
    except asyncio.CancelledError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
