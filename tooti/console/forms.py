"""The console's form parsing: every page module reads its form fields here, and the
page modules never import from each other (user, operator and admin pages each import
this module, the service, and the admin API's parsing helpers).

A refused field raises :class:`FormError` (a :class:`ValueError`) whose message names the
field; the page re-renders its form with the message and status 400, and nothing is
done. Money and durations are not parsed here a second time: an amount or a budget is
read by the admin API's :func:`~tooti.admin.accounts_api.amount_of` /
:func:`~tooti.admin.accounts_api.optional_amount` (so a form says what ``POST
/admin/v1/keys`` says), a duration by :func:`tooti.accounts.durations.parse_duration`
(the CLI's grammar).

* Field helpers: :func:`text_field` (a name, a model id, a group: at most
  :data:`MAX_NAME` characters, no control character), :func:`short_text` (a memo, an
  idempotency key, a code: at most :data:`MAX_TEXT`, optionally required),
  :func:`clipped` (a field cut to a length, for names the service checks itself),
  :func:`whole_number` (a limit: empty → None), :func:`int_field` (a whole number in a
  range, with a default), :func:`budget` and :func:`amount_field` (credits → integer
  micro-units), :func:`expiry_seconds` (a duration, ``never`` or empty),
  :func:`model_list` (comma separated).
* The API key form (the user's ``/console/keys`` and the admin's
  ``/console/admin/accounts/<id>/keys``): :data:`KEY_FIELDS`, :func:`key_form_values`
  (the raw fields, to re-render the form) and :func:`parse_key_form` →
  :class:`KeyForm`; the limits form (``rpm``, ``tpm``, ``concurrency``):
  :func:`parse_limits`; and how a key's state, limits and budgets are shown back
  (:func:`key_state`, :func:`limits_text`, :func:`budgets_text`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from tooti.accounts.durations import parse_duration
from tooti.accounts.money import MAX_AMOUNT, format_credits
from tooti.accounts.records import KeyInfo, Limits
from tooti.admin.accounts_api import amount_of, optional_amount
from tooti.errors import APIError

MAX_NAME = 64
"""Longest name, model id or group in a form."""
MAX_TEXT = 256
"""Longest memo, idempotency key or code (as the admin API's)."""
MAX_EXPIRY = 100 * 365 * 86400
"""The longest expiry a key or code may be given (as the admin API's ``expires_in``)."""
KEY_FIELDS = ("name", "expires", "models", "group", "rpm", "tpm", "concurrency",
              "budget_day", "budget_month")
"""The fields of the API key form."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class FormError(ValueError):
    """A field of a console form is not valid (re-rendered with status 400)."""


class KeyForm(NamedTuple):
    """An API key form, read: what :meth:`~tooti.accounts.service.AccountService.
    create_key` takes (``expires``: seconds from now, None for never)."""

    name: str
    group: str
    models: tuple[str, ...]
    expires: int | None
    limits: Limits


# ------------------------------------------------------------ fields

def text_field(text: str, field: str) -> str:
    """A short single-line text (a name, a model id, a group)."""
    text = text.strip()
    if len(text) > MAX_NAME or _CONTROL.search(text):
        raise FormError(f"{field}: at most {MAX_NAME} characters, no control characters")
    return text


def short_text(text: str, field: str, *, required: bool = False) -> str:
    """A memo, an idempotency key or a code: at most :data:`MAX_TEXT` characters."""
    text = text.strip()
    if required and not text:
        raise FormError(f"{field}: required")
    if len(text) > MAX_TEXT or _CONTROL.search(text):
        raise FormError(f"{field}: at most {MAX_TEXT} characters, no control characters")
    return text


def clipped(form: Mapping[str, str], name: str, limit: int = MAX_NAME) -> str:
    """Field ``name`` stripped and cut to ``limit`` characters (for a value the service
    checks itself, e.g. a group name)."""
    return form.get(name, "").strip()[:limit]


def whole_number(text: str, field: str) -> int | None:
    """A limit: empty → None, else ASCII digits in ``0 … MAX_AMOUNT``."""
    text = text.strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or int(text) > MAX_AMOUNT:
        raise FormError(f"{field}: a whole number of 0 or more (or empty for no limit)")
    return int(text)


def int_field(form: Mapping[str, str], name: str, low: int, high: int,
              default: int | None) -> int | None:
    """An optional whole number in ``[low, high]`` (empty: ``default``)."""
    text = form.get(name, "").strip()
    if not text:
        return default
    label = name.replace("_", " ")
    try:
        value = int(text)
    except ValueError:
        raise FormError(f"{label} must be a whole number") from None
    if not low <= value <= high:
        raise FormError(f"{label} must be between {low} and {high}")
    return value


def budget(text: str, field: str) -> int | None:
    """A budget in credits (``"2.50"``): empty → None, else positive micro-units, read
    as the admin API reads ``budget_day`` (:func:`~tooti.admin.accounts_api.
    optional_amount`)."""
    text = text.strip()
    try:
        return optional_amount(text or None, None, field)
    except APIError as bad:
        raise FormError(f"{field}: {bad.message}") from None


def amount_field(text: str) -> int:
    """Credits as a decimal string (``"12.5"``) → positive micro-units, read by the admin
    API's :func:`~tooti.admin.accounts_api.amount_of`."""
    try:
        return amount_of(text.strip(), None)
    except APIError as bad:
        raise FormError(f"amount: {bad.message}") from None


def expiry_seconds(text: str) -> int | None:
    """``"30d"`` → seconds (:func:`tooti.accounts.durations.parse_duration`, the CLI's
    grammar); ``""``/``"never"`` → None (no expiry); at most :data:`MAX_EXPIRY`."""
    text = text.strip().lower()
    if text in ("", "never"):
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as bad:
        raise FormError(f"expiry: {bad}, or never") from None
    if seconds > MAX_EXPIRY:
        raise FormError("expiry: at most 100 years")
    return seconds


def model_list(text: str) -> tuple[str, ...]:
    """Comma-separated model ids (empty: every model)."""
    names = [text_field(part, "models") for part in text.split(",")]
    return tuple(dict.fromkeys(name for name in names if name))


# ------------------------------------------------------------ forms

def parse_limits(form: Mapping[str, str]) -> Limits:
    """``rpm``, ``tpm``, ``concurrency`` (empty: none), no budgets."""
    return Limits(rpm=whole_number(form.get("rpm", ""), "rpm"),
                  tpm=whole_number(form.get("tpm", ""), "tpm"),
                  concurrency=whole_number(form.get("concurrency", ""), "concurrency"))


def key_form_values(raw: Mapping[str, str]) -> dict[str, str]:
    """The key form's fields as sent (every one of :data:`KEY_FIELDS`, ``""`` if
    absent), to read and to re-render."""
    return {name: str(raw.get(name, "")) for name in KEY_FIELDS}


def parse_key_form(form: Mapping[str, str], groups: Iterable[str], *,
                   member: str = "you are") -> KeyForm:
    """The API key form read, the group one of ``groups`` (the names of the groups the
    key's account belongs to; ``member`` names that account in the message)."""
    name = text_field(form.get("name", ""), "name")
    expires = expiry_seconds(form.get("expires", ""))
    models = model_list(form.get("models", ""))
    group = text_field(form.get("group", ""), "group")
    limits = parse_limits(form)
    limits = Limits(rpm=limits.rpm, tpm=limits.tpm, concurrency=limits.concurrency,
                    budget_day=budget(form.get("budget_day", ""), "daily budget"),
                    budget_month=budget(form.get("budget_month", ""), "monthly budget"))
    if group and group not in set(groups):
        raise FormError(f"group: {member} not a member of a group {group!r}")
    return KeyForm(name, group, models, expires, limits)


# ------------------------------------------------------------ shown back

def key_state(key: KeyInfo, now: float) -> str:
    """``revoked``, ``expired`` or ``active``."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def limits_text(limits: Limits) -> str:
    """The rate limits of a key as a short text (``-``: none)."""
    parts = [f"{name} {value}" for name, value in (
        ("rpm", limits.rpm), ("tpm", limits.tpm), ("concurrency", limits.concurrency))
        if value is not None]
    return ", ".join(parts) or "-"


def budgets_text(limits: Limits) -> str:
    """The budgets of a key in credits (``-``: none)."""
    parts = [f"{format_credits(value)} / {name}" for name, value in (
        ("day", limits.budget_day), ("month", limits.budget_month)) if value is not None]
    return ", ".join(parts) or "-"
