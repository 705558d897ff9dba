"""The domain-event dispatcher: turns each event into downstream tasks and does no I/O itself.

Run by the ``domain-events-dispatcher`` Consumer as ``eventrails worker app.events:worker``.
Every task it enqueues has a dedupe key derived from the event, so an event delivered
twice still enqueues each task once.
"""

from __future__ import annotations

from eventrails import Context, Worker

from app.models import CustomerDeleted, InvoicePaid, PurgeCustomerData, SendEmail

worker = Worker()


@worker.event("InvoicePaid")
async def on_invoice_paid(payload: InvoicePaid, ctx: Context) -> None:
    await ctx.publisher.enqueue(
        "jobs", "send-email",
        SendEmail(
            organizationId=payload.organizationId, projectId=payload.projectId,
            customerId=payload.customerId, template="receipt", invoiceId=payload.invoiceId,
        ),
        dedupe_key=f"receipt-{payload.invoiceId}",
    )


@worker.event("CustomerDeleted")
async def on_customer_deleted(payload: CustomerDeleted, ctx: Context) -> None:
    await ctx.publisher.enqueue(
        "jobs", "purge-customer-data",
        PurgeCustomerData(organizationId=payload.organizationId, projectId=payload.projectId, customerId=payload.customerId),
        dedupe_key=f"purge-{payload.customerId}",
    )
