"""The payload contract (as the reconcile core writes it into stream metadata) and the handler contract
(what ``Worker`` accepts as a handler and how ``eventrails worker`` finds it)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from eventrails import ConfigurationError, Context, PayloadError, Worker
from eventrails._contract import Contract
from eventrails._manifests import parse_resource
from eventrails._publisher import encode_payload, payload_object, tenancy_header
from eventrails._resources import API_VERSION, Topic
from eventrails._worker_main import load_worker
from eventrails_operator._desired import BusConnection, topic_streams


def _topic(spec: dict[str, Any], name: str = "billing") -> Topic:
    body = {"apiVersion": API_VERSION, "kind": "Topic", "metadata": {"name": name, "namespace": "shop"}, "spec": spec}
    topic = parse_resource(body)
    assert isinstance(topic, Topic)
    return topic


def _contract(spec: dict[str, Any], name: str = "billing") -> Contract:
    streams = topic_streams(_topic(spec, name), BusConnection(servers=("nats://127.0.0.1:4222",)))
    return Contract.from_metadata(name, streams.stream.name or "", streams.stream.metadata)


# --- payload contract ------------------------------------------------------------------------


def test_contract_from_stream_metadata() -> None:
    contract = _contract({"tasks": ["send-invoice", "refresh-cache"], "payload": {"exempt": ["refresh-cache"]}})

    assert contract.stream == "shop_billing"
    assert contract.kind == "tasks"
    assert contract.names == ("send-invoice", "refresh-cache")
    assert contract.required_keys == ("organizationId", "projectId")
    assert contract.exempt == frozenset({"refresh-cache"})


def test_contract_event_topic() -> None:
    contract = _contract({"events": ["InvoicePaid"], "payload": {"requiredKeys": ["tenantId"]}}, "domain-events")

    assert contract.kind == "events"
    assert contract.required_keys == ("tenantId",)


def test_check_name_unknown() -> None:
    contract = _contract({"tasks": ["send-invoice"]})

    with pytest.raises(PayloadError) as caught:
        contract.check_name("send-invoices")

    message = str(caught.value)
    assert "'send-invoices' is not declared by topic 'billing'" in message
    assert "['send-invoice']" in message
    assert "spec.tasks" in message


@pytest.mark.parametrize(
    ("payload", "missing"),
    [
        ({"invoiceId": "inv_1", "organizationId": "org_1"}, ["projectId"]),
        ({"invoiceId": "inv_1", "organizationId": "org_1", "projectId": ""}, ["projectId"]),
        ({"invoiceId": "inv_1", "organizationId": "  ", "projectId": None}, ["organizationId", "projectId"]),
        ({"organizationId": "org_1", "projectId": 7}, []),
    ],
    ids=["absent", "empty", "blank-and-null", "present"],
)
def test_missing_keys_cases(payload: dict[str, Any], missing: list[str]) -> None:
    contract = _contract({"tasks": ["send-invoice"]})

    assert contract.missing_keys("send-invoice", payload) == missing


def test_check_payload_missing_key() -> None:
    contract = _contract({"tasks": ["send-invoice"]})

    with pytest.raises(PayloadError) as caught:
        contract.check_payload("send-invoice", {"organizationId": "org_1"})

    message = str(caught.value)
    assert "'projectId'" in message
    assert "add them to the payload" in message
    assert "spec.payload.exempt of Topic 'billing'" in message


def test_check_payload_exempt_name() -> None:
    contract = _contract({"tasks": ["send-invoice", "refresh-cache"], "payload": {"exempt": ["refresh-cache"]}})

    contract.check_payload("refresh-cache", {})
    assert contract.missing_keys("send-invoice", {}) == ["organizationId", "projectId"]


def test_contract_without_metadata() -> None:
    with pytest.raises(ConfigurationError, match="shop_billing of topic 'billing' has no eventrails metadata"):
        Contract.from_metadata("billing", "shop_billing", {"_nats.req.level": "1"})


@pytest.mark.parametrize(
    ("key", "header"),
    [
        ("organizationId", "Eventrails-Organization-Id"),
        ("projectId", "Eventrails-Project-Id"),
        ("tenant_id", "Eventrails-Tenant-Id"),
        ("workspaceUUID", "Eventrails-Workspace-Uuid"),
    ],
)
def test_tenancy_header_names(key: str, header: str) -> None:
    assert tenancy_header(key) == header


class _Invoice(BaseModel):
    invoice_id: str = Field(alias="invoiceId")
    organization_id: str = Field(alias="organizationId")


def test_payload_object_uses_aliases() -> None:
    data = payload_object("send-invoice", _Invoice(invoiceId="inv_1", organizationId="org_1"))

    assert data == {"invoiceId": "inv_1", "organizationId": "org_1"}


@pytest.mark.parametrize("payload", [["inv_1"], "inv_1", None], ids=repr)
def test_payload_object_rejects_non_objects(payload: object) -> None:
    with pytest.raises(PayloadError, match="must be a JSON object"):
        payload_object("send-invoice", payload)


def test_encode_payload_rejects_non_json() -> None:
    with pytest.raises(PayloadError, match="not JSON-serialisable"):
        encode_payload("send-invoice", {"invoiceId": object()})


# --- handler contract ------------------------------------------------------------------------


def test_handler_payload_model() -> None:
    worker = Worker()

    @worker.task("send-invoice")
    async def send_invoice(payload: _Invoice, ctx: Context) -> None:
        return None

    @worker.event("InvoicePaid")
    async def invoice_paid(payload: dict[str, Any], ctx: Context) -> None:
        return None

    task, event = worker.handler("send-invoice"), worker.handler("InvoicePaid")
    assert task is not None
    assert event is not None
    assert task.model is _Invoice
    assert task.kind == "task"
    assert event.model is None
    assert event.kind == "event"
    assert isinstance(task.parse({"invoiceId": "inv_1", "organizationId": "org_1"}), _Invoice)
    assert event.parse({"a": 1}) == {"a": 1}
    assert worker.names == ["InvoicePaid", "send-invoice"]


@pytest.mark.parametrize(
    ("register", "name", "message"),
    [
        ("task", "SendInvoice", "use lower-kebab-case"),
        ("task", "send_invoice", "use lower-kebab-case"),
        ("event", "invoice-paid", "use PascalCase"),
    ],
)
def test_handler_name_patterns(register: str, name: str, message: str) -> None:
    worker = Worker()

    with pytest.raises(ConfigurationError, match=message):
        getattr(worker, register)(name)


def test_handler_signature_checks() -> None:
    worker = Worker()

    def blocking(payload: dict[str, Any], ctx: Context) -> None:
        return None

    async def one_parameter(payload: dict[str, Any]) -> None:
        return None

    with pytest.raises(ConfigurationError, match="must be an async def function"):
        worker.task("send-invoice")(blocking)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"must take \(payload, ctx\)"):
        worker.task("send-invoice")(one_parameter)  # type: ignore[arg-type]


def test_handler_registered_twice() -> None:
    worker = Worker()

    @worker.task("send-invoice")
    async def first(payload: dict[str, Any], ctx: Context) -> None:
        return None

    with pytest.raises(ConfigurationError, match="already has handler .*first"):

        @worker.task("send-invoice")
        async def second(payload: dict[str, Any], ctx: Context) -> None:
            return None


@pytest.fixture()
def handler_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    package = tmp_path / "contract_handlers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text(textwrap.dedent("""
        from eventrails import Worker

        worker = Worker()
        not_a_worker = object()
    """))
    (package / "broken.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield "contract_handlers"
    for name in [name for name in sys.modules if name.startswith("contract_handlers")]:
        del sys.modules[name]


def test_load_worker_from_cwd(handler_package: str) -> None:
    assert isinstance(load_worker(f"{handler_package}.good:worker"), Worker)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("contract_handlers.good", "use 'module:object'"),
        ("contract_handlers.missing:worker", "module 'contract_handlers.missing' not found"),
        ("contract_handlers.good:wroker", "has no attribute 'wroker'"),
        ("contract_handlers.good:not_a_worker", "is a object, not an eventrails Worker"),
    ],
)
def test_load_worker_bad_references(handler_package: str, reference: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_worker(reference)


def test_load_worker_inner_import_error(handler_package: str) -> None:
    with pytest.raises(ModuleNotFoundError, match="a_module_that_is_not_installed"):
        load_worker(f"{handler_package}.broken:worker")
