"""The console's one form module (:mod:`tooti.console.forms`): the key form read once for
the user's and the admin's pages, money read as the admin API reads it, and page
modules that import forms, never each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tooti.accounts.records import Limits
from tooti.admin.accounts_api import optional_amount
from tooti.console import forms
from tooti.console.forms import FormError, KeyForm, int_field, parse_key_form
from tooti.errors import APIError

PAGES = ("user_pages", "operator_pages", "admin_pages")
FORM = {"name": " ci ", "expires": "30d", "models": "a, b,a", "group": "team",
        "rpm": "60", "tpm": "", "concurrency": "2", "budget_day": "2.50",
        "budget_month": ""}


def test_page_modules_import_forms_never_each_other() -> None:
    folder = Path(forms.__file__).parent
    for page in PAGES:
        tree = ast.parse((folder / f"{page}.py").read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        assert "tooti.console.forms" in imported, page
        assert not imported & {f"tooti.console.{other}" for other in PAGES}, page


def test_parse_key_form_reads_every_field() -> None:
    assert parse_key_form(FORM, ["team"]) == KeyForm(
        "ci", "team", ("a", "b"), 30 * 86400,
        Limits(rpm=60, concurrency=2, budget_day=2_500_000))
    with pytest.raises(FormError, match="alice is not a member of a group 'team'"):
        parse_key_form(FORM, ["other"], member="alice is")
    assert parse_key_form({}, []) == KeyForm("", "", (), None, Limits())


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1.0000001", "1e3"])
def test_budget_refused_with_the_admin_apis_words(text: str) -> None:
    with pytest.raises(APIError) as api:
        optional_amount(text, None, "daily budget")
    with pytest.raises(FormError) as form:
        parse_key_form({**FORM, "budget_day": text}, ["team"])
    assert str(form.value) == f"daily budget: {api.value.message}"


def test_int_field_range_and_default() -> None:
    assert int_field({"n": " 7 "}, "n", 1, 10, None) == 7
    assert int_field({}, "max_uses", 1, 10, 1) == 1
    with pytest.raises(FormError, match="max uses must be between 1 and 10"):
        int_field({"max_uses": "11"}, "max_uses", 1, 10, 1)
    with pytest.raises(ValueError, match="must be a whole number"):  # FormError is one
        int_field({"max_uses": "x"}, "max_uses", 1, 10, 1)
