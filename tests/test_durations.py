"""The one duration grammar (:mod:`tooti.accounts.durations`), read alike by the CLI
and the web console's forms."""

from __future__ import annotations

import argparse

import pytest

from tooti.accounts.durations import parse_duration
from tooti.cli_accounts import duration
from tooti.console.forms import MAX_EXPIRY, FormError, expiry_seconds

TEXTS = ["3600", "90m", "12h", "30d", "4w", " 2 H ", "10s", "0", "-5", "5y", "", "1.5h",
         "12345678901", "9" * 5000, "never"]


def test_parse_duration_grammar() -> None:
    assert parse_duration("90m") == 5400 and parse_duration(" 2 D") == 2 * 86400
    assert parse_duration("4w") == 4 * 7 * 86400 and parse_duration("17") == 17
    for bad in ("0", "m", "5y", "1.5h", "9" * 5000):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


@pytest.mark.parametrize("text", TEXTS)
def test_cli_and_console_read_durations_alike(text: str) -> None:
    try:
        cli: int | None = duration(text)
    except argparse.ArgumentTypeError as bad:
        cli, message = None, str(bad)
    try:
        console = expiry_seconds(text)
    except FormError as bad:
        if cli is not None:  # refused by the console only for being too far away
            assert cli > MAX_EXPIRY and "at most 100 years" in str(bad)
            return
        assert message in str(bad)  # the same words
        return
    if text.strip().lower() in ("", "never"):
        assert console is None
    else:
        assert console == cli
