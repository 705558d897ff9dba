"""Outbox locations: a PostgreSQL URI or connection string, or ``sqlite:///path``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from eventrails._errors import ConfigurationError

# SQLAlchemy-style driver suffixes such as postgresql+psycopg:// or postgresql+asyncpg://.
_DRIVER_SUFFIX = re.compile(r"^(postgres(?:ql)?)\+[a-z0-9_]+://")
_PASSWORD_IN_URL = re.compile(r"(://[^:/@]+:)[^@]*@")
_PASSWORD_IN_KEYWORDS = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


@dataclass(frozen=True)
class OutboxDsn:
    """A parsed outbox location; ``display`` is safe to log (no password)."""

    dialect: Literal["postgresql", "sqlite"]
    url: str
    path: str = ""

    @property
    def display(self) -> str:
        if self.dialect == "sqlite":
            return f"sqlite:///{self.path}"
        shown = _PASSWORD_IN_URL.sub(r"\1***@", self.url)
        return _PASSWORD_IN_KEYWORDS.sub(r"\1***", shown)


def parse_dsn(dsn: str) -> OutboxDsn:
    """Parse ``dsn``: ``postgresql://...`` (also ``postgres://`` and ``postgresql+driver://``), a
    libpq ``key=value`` string, or ``sqlite:///relative/path`` and ``sqlite:////absolute/path``.

    Raises ConfigurationError for anything else.
    """
    text = (dsn or "").strip()
    if not text:
        raise ConfigurationError(
            "no outbox database given: pass --dsn (or set EVENTRAILS_OUTBOX_DSN) to a PostgreSQL URI "
            "or sqlite:///path/to/file.db"
        )
    if text.startswith("sqlite:"):
        path = text[len("sqlite:"):]
        if path.startswith("///"):
            path = path[3:]
        elif path.startswith("//"):
            raise ConfigurationError(
                f"outbox DSN {text!r} names a host; SQLite files are local: use sqlite:///relative/path "
                "or sqlite:////absolute/path"
            )
        if not path or path == ":memory:":
            raise ConfigurationError(
                f"outbox DSN {text!r} names no file; the relay and the writers must share one SQLite file: "
                "use sqlite:///path/to/file.db"
            )
        return OutboxDsn("sqlite", text, path)
    match = _DRIVER_SUFFIX.match(text)
    if match:
        text = f"postgresql://{text[match.end():]}"
    if text.startswith(("postgresql://", "postgres://")) or ("=" in text and "://" not in text):
        return OutboxDsn("postgresql", text)
    raise ConfigurationError(
        f"outbox DSN {OutboxDsn('postgresql', text).display!r} is neither PostgreSQL nor SQLite: use "
        "postgresql://user@host:5432/db, a libpq 'host=... dbname=...' string, or sqlite:///path/to/file.db"
    )
