"""Every extension point of tooti, one pluggy hook specification each.

Plugins are Python packages that declare an entry point in the group
``tooti`` (``[project.entry-points.tooti] my-plugin = "my_package.plugin"``)
and implement any of these hooks in that module with ``@tooti.hookimpl``.
tooti's own backends, routing policies and billing register through exactly
these hooks.

All hooks are synchronous (pluggy calls are synchronous): they return
*factories* whose products have async methods. Never write an ``async def``
hook implementation. Each hook returns a mapping from a name (used in config)
to a factory; a name provided twice is an error naming both plugins.
``docs/plugins.md`` documents every hook with its signature; a test checks
that the two agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from tooti.backends.base import Backend
    from tooti.billing.base import Billing, BillingSetup
    from tooti.routing.base import RoutingPolicy
    from tooti.settings import BackendSettings

PROJECT = "tooti"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tooti_backends() -> Mapping[str, Callable[[BackendSettings], Backend]]:  # type: ignore[empty-body]
    """Return backend factories by type name.

    Each factory takes the backend's :class:`~tooti.settings.BackendSettings`
    (``type``, ``url``, ``api_key``, ``models``, ``options``…) and returns an
    object implementing :class:`tooti.backends.base.Backend`. The name is what
    operators write as ``type`` in ``[[node.backends]]`` or ``--backend TYPE``.
    """


@hookspec
def tooti_routing_policies() -> Mapping[  # type: ignore[empty-body]
    str, Callable[[Mapping[str, Any]], RoutingPolicy]
]:
    """Return routing policy factories by policy name.

    Each factory takes the ``[routing.options]`` table and returns an object
    implementing :class:`tooti.routing.base.RoutingPolicy`, whose ``rank``
    orders the candidate nodes for one request. The router, not the policy,
    excludes nodes that already failed the request and handles retries.
    Selected with ``routing.policy`` in config.
    """


@hookspec
def tooti_billing() -> Mapping[str, Callable[[BillingSetup], Billing]]:  # type: ignore[empty-body]
    """Return billing factories by name.

    Each factory takes a :class:`tooti.billing.base.BillingSetup` (data
    directory and the ``[billing.options]`` table) and returns an object
    implementing :class:`tooti.billing.base.Billing`: ``authorize`` (reserve
    before routing; raise :class:`tooti.errors.APIError` to refuse),
    ``settle`` (record what was delivered; idempotent by request id) and
    ``refund`` (release a reservation when nothing was served). Every name in
    ``billing.plugins`` is active, in order.
    """
