"""The task worker: each handler re-fetches what its message points at, does the side effect
and reports an explicit outcome.

Run by the ``jobs-worker`` Consumer as ``eventrails worker app.jobs:worker``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from eventrails import Context, Retry, Skip, Worker

from app import db
from app.models import ChargeCard, InvoicePaid, PurgeCustomerData, SendEmail

logger = logging.getLogger("app.jobs")
worker = Worker()

T = TypeVar("T")


async def _query(operation: Callable[..., T], *args: object) -> T:
    """Run one database operation in a thread, so the event loop keeps serving other messages."""

    def run() -> T:
        connection = db.connect()
        try:
            return operation(connection, *args)
        finally:
            connection.close()

    return await asyncio.to_thread(run)


@worker.task("send-email")
async def send_email(payload: SendEmail, ctx: Context) -> Skip | None:
    customer = await _query(db.get_customer, payload.customerId)
    if customer is None or customer.deleted:
        return Skip(f"customer {payload.customerId} was deleted; no {payload.template} email sent")
    await _query(db.record_email, customer.id, payload.template, payload.invoiceId)
    logger.info("sent %s email to customer %s", payload.template, customer.id)
    return None


@worker.task("charge-card")
async def charge_card(payload: ChargeCard, ctx: Context) -> Skip | Retry | None:
    invoice = await _query(db.get_invoice, payload.invoiceId)
    if invoice is None:
        return Skip(f"invoice {payload.invoiceId} does not exist")
    already_paid = invoice.status == "paid"
    if not already_paid:
        if not await _query(db.record_charge_attempt, invoice.id):
            # No delay given: the consumer's backoff list decides when the next attempt comes.
            return Retry(reason=f"card gateway timed out charging invoice {invoice.id}")
        await _query(db.mark_paid, invoice.id)
        logger.info("charged %d cents for invoice %s", invoice.amount_cents, invoice.id)

    # Announced on every run with the same dedupe key, so a retry after a failed publish
    # still announces it, and announcing twice stores one event.
    await ctx.publisher.publish_event(
        "InvoicePaid",
        InvoicePaid(
            organizationId=payload.organizationId, projectId=payload.projectId,
            invoiceId=invoice.id, customerId=invoice.customer_id,
        ),
        dedupe_key=f"invoice-paid-{invoice.id}",
    )
    if already_paid:
        return Skip(f"invoice {invoice.id} was already paid; not charged again")
    return None


@worker.task("purge-customer-data")
async def purge_customer_data(payload: PurgeCustomerData, ctx: Context) -> Skip | None:
    customer = await _query(db.get_customer, payload.customerId)
    if customer is not None and not customer.deleted:
        return Skip(f"customer {payload.customerId} is active again; nothing purged")
    if not await _query(db.record_purge, payload.customerId):
        return Skip(f"data of customer {payload.customerId} was already purged")
    logger.info("purged the data of customer %s", payload.customerId)
    return None
