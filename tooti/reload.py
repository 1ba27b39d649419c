"""SIGHUP in ``tooti run``: re-read the configuration and apply its join tokens.

The settings are built again exactly as at start (the same file, environment and
flags). The station of a gateway or relay then admits new tunnels by the new join
tokens; tunnels already up stay up. Nothing else is applied: every other key that
changed is named in one warning (names only, never values) as needing a restart. A
file that does not load or validate is one error line, and the tokens in use stay.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from tooti.config import ConfigError
from tooti.mesh.station import Station
from tooti.settings import Settings

log = logging.getLogger("tooti")

Rebuild = Callable[[], Settings]
"""Builds the settings again, the way ``tooti run`` first built them; raises
:class:`~tooti.config.ConfigError`."""


def reload_join_tokens(station: Station | None, running: Settings,
                       rebuild: Rebuild | None) -> None:
    """Re-read the settings with ``rebuild`` and give ``station`` (a gateway's or
    relay's) their join tokens; ``running`` are the settings the process started
    with. Logs what changed, by name. Never raises: a failure must not end the signal
    loop, and the process with it.
    """
    if station is None:
        return
    if rebuild is None:
        log.info("SIGHUP: no configuration to read again; the join tokens stay")
        return
    try:
        loaded = rebuild()
    except ConfigError as exc:
        log.error("SIGHUP: configuration not reloaded, the current join tokens stay in "
                  "use: %s", exc)
        return
    except Exception:  # a bug; the current tokens stay in use
        log.exception("SIGHUP: reading the configuration failed; the current join tokens "
                      "stay in use")
        return
    changes = station.reload_tokens(loaded.gateway)
    done = [f"{what} {', '.join(names)}" for what, names in
            (("added", changes.added), ("removed", changes.removed),
             ("replaced", changes.replaced)) if names]
    if done:
        log.info("SIGHUP: join tokens reloaded: %s (tunnels already up stay up until they "
                 "reconnect)", "; ".join(done))
    else:
        log.info("SIGHUP: join tokens reloaded: unchanged")
    restart = restart_keys(running, loaded)
    if restart:
        log.warning("SIGHUP: changed settings need a restart to apply: %s (only join "
                    "tokens and the TLS certificate are reloaded)", ", ".join(restart))


def restart_keys(running: Settings, loaded: Settings) -> list[str]:
    """The dotted keys whose value differs between ``running`` and ``loaded``, except
    the gateway's join tokens (ungrouped, and of the node groups it runs), which a
    reload applies."""
    applied = copy.deepcopy(loaded)
    applied.gateway.join_token = running.gateway.join_token
    applied.gateway.join_tokens = running.gateway.join_tokens
    for name, group in applied.gateway.groups.items():
        if name in running.gateway.groups:
            group.join_token = running.gateway.groups[name].join_token
            group.join_tokens = running.gateway.groups[name].join_tokens
    return _differences(running, applied, "")


def _differences(old: Any, new: Any, where: str) -> list[str]:
    """Where two settings values differ: recursing into settings Structs and tables of them."""
    if isinstance(old, msgspec.Struct) and type(old) is type(new):
        return [key for name in old.__struct_fields__
                for key in _differences(getattr(old, name), getattr(new, name),
                                        f"{where}.{name}" if where else name)]
    if (isinstance(old, dict) and isinstance(new, dict)
            and any(isinstance(v, msgspec.Struct) for v in (*old.values(), *new.values()))):
        return [key for name in sorted(old.keys() | new.keys())
                for key in ([f"{where}.{name}"] if (name in old) != (name in new)
                            else _differences(old[name], new[name], f"{where}.{name}"))]
    return [] if old == new else [where]
