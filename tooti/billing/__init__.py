"""Billing: reserve → settle → refund around every request (see :mod:`tooti.billing.base`)."""
