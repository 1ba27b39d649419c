"""Money in integer micro-units, never floats: 1 credit = 1,000,000 micro-units.

Node prices are advertised in credits per 1M tokens; at entry they become integer
micro-units per 1M tokens (:func:`price_micros`), and a request costs
``ceil((prompt * price_in + completion * price_out) / 1,000,000)`` micro-units
(:func:`cost_micros`), computed in integers."""

from __future__ import annotations

import re

MICROS = 1_000_000
"""Micro-units per credit."""
MAX_AMOUNT = 10**15
"""The largest amount a top-up, code or budget may be (a billion credits)."""
_DECIMAL = re.compile(r"([0-9]{1,10})(?:\.([0-9]{1,6}))?")
"""ASCII digits only (``\\d`` would take any Unicode digit: ``"٣"`` is not an amount)."""


def parse_credits(text: str) -> int:
    """``"12.5"`` credits → 12,500,000 micro-units (at most 6 decimals; never a float).
    Raises ValueError for anything else, negative or above :data:`MAX_AMOUNT`."""
    match = _DECIMAL.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an amount of credits: {text!r} (write e.g. 10 or 2.50)")
    whole, frac = match.group(1), (match.group(2) or "").ljust(6, "0")
    amount = int(whole) * MICROS + int(frac)
    if amount > MAX_AMOUNT:
        raise ValueError(f"{text} credits is more than the largest amount allowed")
    return amount


def format_credits(micros: int) -> str:
    """12,500,000 → ``"12.5"`` (exact; trailing zeros dropped)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{frac:06d}".rstrip("0").rstrip(".") if frac else f"{sign}{whole}"


def price_micros(price_per_million: float) -> int:
    """A node's advertised price (credits per 1M tokens, a number checked at entry to be
    finite and within bounds) as integer micro-units per 1M tokens."""
    if not price_per_million > 0:  # zero, negative or NaN
        return 0
    return round(price_per_million * MICROS)


def cost_micros(prompt_tokens: int, completion_tokens: int, price_input: int,
                price_output: int) -> int:
    """What tokens cost at prices in micro-units per 1M tokens, rounded up to a whole
    micro-unit (integers throughout)."""
    total = max(prompt_tokens, 0) * max(price_input, 0) + max(completion_tokens, 0) * max(
        price_output, 0)
    return -(-total // 1_000_000)


def split_fee(amount: int, fee_bps: int) -> tuple[int, int]:
    """``(operator's share, fee)`` of ``amount`` with a fee in basis points (1/100 of a
    percent); the fee is rounded down, the two always sum to ``amount``."""
    fee = amount * max(0, min(fee_bps, 10_000)) // 10_000
    return amount - fee, fee
