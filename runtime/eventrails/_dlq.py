"""Read and replay a topic's dead letters: the messages workers gave up on.

The dispatcher stores each dead letter in the topic's dead-letter stream
(``<namespace>_<topic>_dlq``) with the original payload and headers plus why it failed
(``Eventrails-Dlq-*``) and where it came from (``Eventrails-Original-*``). ``DeadLetters``
lists them, shows one, and replays them: each goes back to its original subject under a
new ``Nats-Msg-Id`` (``<original id>-replay-<dead-letter seq>``), with the original id kept
in ``Eventrails-Original-Msg-Id``. The new id is derived, not random, so replaying the same
entry twice within the topic's duplicate window stores it once and reports the duplicate.
An entry is deleted from the dead-letter stream only after JetStream acknowledged its
replay, unless asked to keep it.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import RawStreamMsg
from pydantic import BaseModel, ConfigDict

from eventrails import _naming, _schedule
from eventrails._dispatcher import (
    DELIVERY_HEADER,
    DLQ_ERROR_HEADER,
    DLQ_ERROR_TYPE_HEADER,
    DLQ_REASON_HEADER,
    ORIGINAL_MSG_ID_HEADER,
    ORIGINAL_SUBJECT_HEADER,
    STREAM_SEQ_HEADER,
)
from eventrails._errors import ConfigurationError, JetStreamNotFound, translate
from eventrails._publisher import MSG_ID_HEADER, NAME_HEADER, publish_with_retry
from eventrails._settings import NatsSettings

logger = logging.getLogger("eventrails.dlq")

# JetStream error codes of the two "not found" errors.
_STREAM_NOT_FOUND = 10059
_NO_MESSAGE = 10037

# Header with the origin of a replayed message: "<dead-letter stream>:<seq>".
REPLAYED_FROM_HEADER = "Eventrails-Replayed-From"

# Headers that describe the dead-lettering, not the message; a replay leaves them behind.
_DEAD_LETTER_ONLY = {
    DLQ_REASON_HEADER, DLQ_ERROR_TYPE_HEADER, DLQ_ERROR_HEADER, ORIGINAL_SUBJECT_HEADER, STREAM_SEQ_HEADER,
    DELIVERY_HEADER, MSG_ID_HEADER, _schedule.MSG_ID_HEADER, _schedule.DUE_HEADER, REPLAYED_FROM_HEADER,
}


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class DeadLetter(BaseModel):
    """One entry of a dead-letter stream, with the ids and reasons the dispatcher recorded."""

    model_config = ConfigDict(frozen=True)

    seq: int
    time: datetime | None
    subject: str
    original_subject: str
    name: str
    reason: str
    error_type: str
    error: str
    delivery: int | None
    original_msg_id: str
    original_seq: int | None
    headers: dict[str, str]
    data: bytes

    @classmethod
    def from_message(cls, msg: RawStreamMsg) -> DeadLetter:
        headers = dict(msg.headers or {})
        original_subject = headers.get(ORIGINAL_SUBJECT_HEADER, "")
        return cls(
            seq=msg.seq or 0,
            time=msg.time,
            subject=msg.subject or "",
            original_subject=original_subject,
            name=headers.get(NAME_HEADER) or original_subject.rsplit(".", 1)[-1],
            reason=headers.get(DLQ_REASON_HEADER, ""),
            error_type=headers.get(DLQ_ERROR_TYPE_HEADER, ""),
            error=headers.get(DLQ_ERROR_HEADER, ""),
            delivery=_int(headers.get(DELIVERY_HEADER)),
            original_msg_id=headers.get(ORIGINAL_MSG_ID_HEADER, ""),
            original_seq=_int(headers.get(STREAM_SEQ_HEADER)),
            headers=headers,
            data=msg.data or b"",
        )

    def summary(self) -> dict[str, Any]:
        """Return the listing fields (no payload, no headers) as JSON-ready values."""
        return {
            "seq": self.seq, "time": self.time.isoformat() if self.time else None, "name": self.name,
            "originalSubject": self.original_subject, "reason": self.reason, "errorType": self.error_type,
            "delivery": self.delivery, "originalMsgId": self.original_msg_id,
        }


class Replay(BaseModel):
    """The result of replaying one dead letter: the new message id and sequence, and whether the entry was deleted."""

    model_config = ConfigDict(frozen=True)

    dead_letter_seq: int
    subject: str
    msg_id: str
    original_msg_id: str
    stream: str
    seq: int
    duplicate: bool
    removed: bool


class DeadLetters:
    """The dead letters of one topic, read and replayed over a NATS connection the caller owns."""

    def __init__(self, nc: NATS, settings: NatsSettings, topic: str, *, publish_deadline: float = 10.0) -> None:
        self._nc = nc
        self._js = nc.jetstream(domain=settings.jetstream_domain)
        self._settings = settings
        self.topic = topic
        self.stream = _naming.dead_letter_stream_name(settings.namespace, topic)
        self.topic_stream = _naming.stream_name(settings.namespace, topic)
        self._wildcard = _naming.dead_letter_wildcard(settings.subject_prefix, settings.namespace, topic)
        self._publish_deadline = publish_deadline

    async def count(self) -> int:
        try:
            info = await self._js.stream_info(self.stream)
        except Exception as error:  # noqa: BLE001 - translated below
            raise self._translate(error, "read") from error
        return info.state.messages

    async def list(self, limit: int = 100, start: int = 1) -> list[DeadLetter]:
        """Return up to ``limit`` dead letters from sequence ``start`` on, oldest first."""
        entries: list[DeadLetter] = []
        seq = max(start, 1)
        while len(entries) < limit:
            try:
                msg = await self._js.get_msg(self.stream, seq, subject=self._wildcard, next=True)
            except Exception as error:  # noqa: BLE001 - "no message" ends the listing
                translated = self._translate(error, "read")
                if isinstance(translated, JetStreamNotFound) and translated.err_code == _NO_MESSAGE:
                    break
                raise translated from error
            entries.append(DeadLetter.from_message(msg))
            seq = (msg.seq or seq) + 1
        return entries

    async def get(self, seq: int) -> DeadLetter:
        """Return dead letter ``seq``; raise JetStreamNotFound naming the stream when there is none."""
        try:
            msg = await self._js.get_msg(self.stream, seq)
        except Exception as error:  # noqa: BLE001 - translated below
            translated = self._translate(error, f"read seq {seq} of")
            if isinstance(translated, JetStreamNotFound) and translated.err_code == _NO_MESSAGE:
                raise JetStreamNotFound(
                    f"dead-letter stream {self.stream} has no message with seq {seq}; list them with "
                    f"`eventrails dlq list {self.topic}`", err_code=translated.err_code,
                ) from error
            raise translated from error
        return DeadLetter.from_message(msg)

    async def replay(self, seq: int, *, keep: bool = False) -> Replay:
        """Publish dead letter ``seq`` to its original subject again and delete it, unless ``keep``.

        Nothing is deleted before JetStream acknowledged the republished message. A
        duplicate acknowledgement (the same entry replayed within the duplicate window)
        still deletes the entry, since its earlier replay is stored. Raises the translated
        error when the publish fails; the entry then stays.
        """
        entry = await self.get(seq)
        if not entry.original_subject:
            raise ConfigurationError(
                f"dead letter {seq} in {self.stream} has no {ORIGINAL_SUBJECT_HEADER} header, so its subject is "
                "unknown; it was not written by an eventrails worker"
            )
        original_id = entry.original_msg_id or f"{self.stream}-{seq}"
        msg_id = f"{original_id}-replay-{seq}"
        headers = {key: value for key, value in entry.headers.items() if key not in _DEAD_LETTER_ONLY}
        headers.update({
            MSG_ID_HEADER: msg_id,
            ORIGINAL_MSG_ID_HEADER: original_id,
            REPLAYED_FROM_HEADER: f"{self.stream}:{seq}",
        })
        ack = await publish_with_retry(
            self._nc, self._js, entry.original_subject, entry.data, headers, stream=self.topic_stream,
            description=f"replay dead letter {seq} of {self.stream} (msg id {msg_id}) to {entry.original_subject}",
            deadline=self._publish_deadline,
        )
        if ack.duplicate:
            logger.warning(
                "dead letter %d of %s: JetStream already had msg id %s (stream %s seq %d), so nothing new was "
                "stored; it was replayed before within the duplicate window",
                seq, self.stream, msg_id, ack.stream, ack.seq,
            )
        else:
            logger.info(
                "replayed dead letter %d of %s to %s as msg id %s (stream %s seq %d)",
                seq, self.stream, entry.original_subject, msg_id, ack.stream, ack.seq,
            )

        removed = False
        if not keep:
            try:
                removed = bool(await self._js.delete_msg(self.stream, seq))
            except Exception as error:  # noqa: BLE001 - the replay stands; the entry stays for another look
                logger.warning(
                    "dead letter %d of %s was replayed but could not be deleted (%s); a second replay within the "
                    "duplicate window is reported as a duplicate", seq, self.stream, self._translate(error, "delete from"),
                )
        return Replay(
            dead_letter_seq=seq, subject=entry.original_subject, msg_id=msg_id, original_msg_id=original_id,
            stream=ack.stream, seq=ack.seq, duplicate=bool(ack.duplicate), removed=removed,
        )

    def _translate(self, error: BaseException, action: str) -> Exception:
        translated = translate(error, f"{action} dead-letter stream {self.stream} of topic {self.topic!r}")
        if isinstance(translated, JetStreamNotFound) and translated.err_code == _STREAM_NOT_FOUND:
            return JetStreamNotFound(
                f"topic {self.topic!r} has no dead-letter stream {self.stream} in namespace "
                f"{self._settings.namespace!r}; check the topic and namespace, or enable spec.deadLetter on the Topic",
                err_code=translated.err_code,
            )
        return translated
