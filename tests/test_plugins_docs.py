"""docs/plugins.md documents every hook of tooti.hookspecs with its exact signature."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tooti import hookspecs, plugins

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"

# A documented signature: a Markdown heading whose code span is the signature
# (### `tooti_x(...) -> ...`), or a code line `def tooti_x(...) -> ...:`.
HEADING = re.compile(r"^#{1,6}\s+`(?P<sig>tooti_\w+\s*\(.*\)\s*->.*?)`\s*$")
CODE_LINE = re.compile(r"^\s*def\s+(?P<sig>tooti_\w+\s*\(.*\)\s*->.*?):\s*(?:\.\.\.)?\s*$")
SIGNATURE = re.compile(r"^(?P<name>tooti_\w+)\s*\((?P<params>.*)\)\s*->\s*(?P<ret>.+)$")


def hookspec_functions() -> dict[str, Callable[..., Any]]:
    """Every function in tooti.hookspecs marked with the hookspec marker."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: obj for name, obj in vars(hookspecs).items()
            if inspect.isfunction(obj) and hasattr(obj, marker)}


def _squash(text: str) -> str:
    """Normalise whitespace away (line breaks and indentation inside brackets)."""
    return re.sub(r"\s+", "", text)


def _annotation(value: Any) -> str:
    # With ``from __future__ import annotations`` the annotations are strings already.
    return value if isinstance(value, str) else inspect.formatannotation(value)


def expected_signature(function: Callable[..., Any]) -> tuple[str, str]:
    """(parameter list, return annotation) of a hookspec, as source-like text."""
    signature = inspect.signature(function)
    params = []
    for param in signature.parameters.values():
        text = param.name
        if param.kind is param.VAR_POSITIONAL:
            text = "*" + text
        elif param.kind is param.VAR_KEYWORD:
            text = "**" + text
        if param.annotation is not param.empty:
            text += f": {_annotation(param.annotation)}"
        if param.default is not param.empty:
            text += f" = {param.default!r}"
        params.append(text)
    returns = signature.return_annotation
    return ", ".join(params), "" if returns is signature.empty else _annotation(returns)


def documented_signatures(text: str) -> dict[str, list[tuple[str, str]]]:
    """Hook name → every (parameter list, return annotation) the doc shows for it."""
    found: dict[str, list[tuple[str, str]]] = {}
    for line in text.splitlines():
        match = HEADING.match(line) or CODE_LINE.match(line)
        if match is None:
            continue
        parts = SIGNATURE.match(match["sig"].strip())
        assert parts is not None, f"cannot parse documented signature: {line!r}"
        found.setdefault(parts["name"], []).append((parts["params"], parts["ret"]))
    return found


def test_there_are_hooks_and_the_loader_knows_them_all() -> None:
    assert set(hookspec_functions()) == set(plugins.HOOKS)


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_hookspec_has_a_docstring(name: str) -> None:
    doc = inspect.getdoc(hookspec_functions()[name])
    assert doc and doc.strip(), f"hookspec {name} has no docstring"


@pytest.mark.parametrize("name", sorted(hookspec_functions()))
def test_hook_is_documented_with_its_exact_signature(name: str) -> None:
    documented = documented_signatures(DOC.read_text(encoding="utf-8"))
    assert name in documented, f"{name} is not documented in {DOC.name}"
    params, returns = expected_signature(hookspec_functions()[name])
    for doc_params, doc_returns in documented[name]:
        assert _squash(doc_params) == _squash(params), (
            f"{DOC.name} documents {name}({doc_params}), hookspec has {name}({params})")
        assert _squash(doc_returns) == _squash(returns), (
            f"{DOC.name} documents {name}() -> {doc_returns}, hookspec has -> {returns}")


def test_doc_documents_no_hook_that_does_not_exist() -> None:
    documented = documented_signatures(DOC.read_text(encoding="utf-8"))
    assert set(documented) <= set(hookspec_functions())


def test_signature_parser_catches_a_wrong_signature() -> None:
    """The checker itself: a differing return annotation or parameter is noticed."""
    text = ("### `tooti_billing() -> Mapping[str, Callable[[BillingSetup], Billing]]`\n"
            "```python\ndef tooti_backends(config: dict) -> Mapping[str, Any]:\n```\n")
    documented = documented_signatures(text)
    assert documented["tooti_billing"] == [("", "Mapping[str, Callable[[BillingSetup], Billing]]")]
    assert documented["tooti_backends"] == [("config: dict", "Mapping[str, Any]")]
    params, returns = expected_signature(hookspecs.tooti_backends)
    assert (params, _squash(returns)) != ("config: dict", _squash("Mapping[str, Any]"))
