"""Payloads of the example's tasks and events: small JSON objects of IDs, validated by pydantic.

Every payload carries the tenancy keys ``organizationId`` and ``projectId``, which the
Topics require by default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    organizationId: str = Field(min_length=1)
    projectId: str = Field(min_length=1)


class SendEmail(_Payload):
    customerId: str
    template: Literal["welcome", "receipt", "goodbye"]
    invoiceId: str | None = None


class ChargeCard(_Payload):
    invoiceId: str
    amountCents: int = Field(gt=0)


class PurgeCustomerData(_Payload):
    customerId: str


class InvoicePaid(_Payload):
    invoiceId: str
    customerId: str


class CustomerDeleted(_Payload):
    customerId: str
