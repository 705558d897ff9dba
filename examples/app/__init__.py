"""A small billing app for the eventrails example: customers, invoices and the workers behind them.

``db`` is the app's database (SQLite), ``models`` the message payloads, ``jobs`` the task
worker that does the side effects and ``events`` the domain-event dispatcher that turns
events into tasks; ``signup`` writes a customer and its welcome email's outbox row in one
transaction.
"""
