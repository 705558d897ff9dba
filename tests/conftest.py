pytest_plugins = ["eventrails.testing"]


# --- PostgreSQL for the outbox tests -------------------------------------------------------------

import uuid as _uuid  # noqa: E402 - the fixtures below are appended to the shared conftest
from collections.abc import Iterator as _Iterator  # noqa: E402

import pytest as _pytest  # noqa: E402

from eventrails._pgserver import PostgresNotFound as _PostgresNotFound  # noqa: E402
from eventrails._pgserver import PostgresServer as _PostgresServer  # noqa: E402


@_pytest.fixture(scope="session")
def postgres() -> _Iterator[_PostgresServer]:
    """One PostgreSQL server for the session, on 127.0.0.1 and a free port, in its own temporary directory."""
    server = _PostgresServer()
    try:
        server.start()
    except _PostgresNotFound as error:
        _pytest.skip(str(error))
    try:
        yield server
    finally:
        server.cleanup()


@_pytest.fixture()
def pg_dsn(postgres: _PostgresServer) -> _Iterator[str]:
    """The URI of a fresh, empty database of its own for one test."""
    import psycopg

    name = f"test_{_uuid.uuid4().hex[:12]}"
    dsn = postgres.create_database(name)
    yield dsn
    with psycopg.connect(postgres.dsn(), autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
