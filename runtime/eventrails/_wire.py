"""Publishing on a nats-py connection with the header block built in one step.

nats-py's ``Client.publish`` encodes headers key by key: it strips, checks and encodes
each name and value into a bytearray, which costs more per message than the rest of the
publish. eventrails sends a few header names of its own, with values it built itself. So
``Wire`` joins them into one string and checks the result once for line breaks. Then it
hands the finished HPUB command to the client's pending buffer, as ``publish`` does.

Anything out of the ordinary goes through ``Client.publish`` instead, so nats-py's own
checks and errors apply. That covers a header name it has not seen, a value with a line
break, a subject with a blank in it, a message over the server's size limit, and a
client that is reconnecting, draining or closed.

The fast path reads a few of the client's internals (its pending buffer and flusher).
``Wire.for_client`` checks that they are there and returns None otherwise, so a nats-py
release that renames them makes the callers fall back to ``Client.publish``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from nats.aio.client import Client as NATS
from nats.protocol.command import hpub_cmd, pub_cmd

# The characters nats-py accepts in a header name.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Characters nats-py rejects in a subject, because a blank or line break would end the command early.
_SUBJECT_BLANK = re.compile(r"[ \t\r\n]")
_INTERNALS = ("_send_command", "_flush_pending", "_flush_queue", "_max_payload", "stats")


class Wire:
    """Sends PUB and HPUB commands for one nats-py client; see the module docstring."""

    __slots__ = ("_nc", "_names")

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        # Header names that passed the protocol's check once; they are a handful of constants.
        self._names: set[str] = set()

    @classmethod
    def for_client(cls, nc: object) -> Wire | None:
        """Return a Wire for a nats-py client that has the internals it uses, else None."""
        if isinstance(nc, NATS) and all(hasattr(nc, name) for name in _INTERNALS):
            return cls(nc)
        return None

    def header_block(self, headers: Mapping[str, str]) -> bytes | None:
        """Return the encoded header block, or None when nats-py's encoder has to handle the headers."""
        names = self._names
        for name in headers:
            if name not in names:
                if not _HEADER_NAME.fullmatch(name):
                    return None
                names.add(name)
        text = "NATS/1.0\r\n" + "".join([f"{name}: {value.strip()}\r\n" for name, value in headers.items()]) + "\r\n"
        lines = len(headers) + 2
        if text.count("\n") != lines or text.count("\r") != lines:
            return None  # a value with a line break in it
        return text.encode()

    async def publish(self, subject: str, body: bytes, reply: str = "", headers: Mapping[str, str] | None = None) -> None:
        """Publish like ``Client.publish(subject, body, reply, headers)``."""
        nc = self._nc
        if headers is None:
            command = pub_cmd(subject, reply, body)
        else:
            block = self.header_block(headers)
            if block is None:
                await nc.publish(subject, body, reply=reply, headers=dict(headers))
                return
            command = hpub_cmd(subject, reply, block, body)
        if (
            not nc.is_connected or nc.is_draining_pubs or len(body) > nc._max_payload
            or _SUBJECT_BLANK.search(subject) or _SUBJECT_BLANK.search(reply) or not subject
        ):
            # nats-py buffers during a reconnect, or raises the error that fits.
            await nc.publish(subject, body, reply=reply, headers=None if headers is None else dict(headers))
            return
        stats = nc.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += len(body)
        await nc._send_command(command)
        flush_queue = nc._flush_queue
        if flush_queue is not None and flush_queue.empty():
            await nc._flush_pending()
