"""Loading plugins and looking up what they provide.

Built-in plugins (:data:`DEFAULT_PLUGINS`) are registered first, through the
same hooks as third-party ones. Then every entry point in the group ``tooti``
is loaded — unless ``TOOTI_DISABLE_PLUGIN_AUTOLOAD`` is set — and finally any
``*.py`` file in the plugins directory (``--plugins-dir`` /
``TOOTI_PLUGINS_DIR``), handy while writing a plugin. A plugin that fails to
import is recorded with its error and the others still load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from tooti import hookspecs

log = logging.getLogger("tooti.plugins")

DEFAULT_PLUGINS = (
    "tooti.backends",
    "tooti.routing.policies",
    "tooti.billing.ledger",
)
HOOKS = ("tooti_backends", "tooti_routing_policies", "tooti_billing")
AUTOLOAD_ENV = "TOOTI_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_DIR_ENV = "TOOTI_PLUGINS_DIR"


class PluginError(Exception):
    """A name provided twice, or asked for and not provided."""


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, for ``tooti plugins``."""

    name: str
    source: str
    """``built-in``, ``entry point`` or ``plugins dir``."""
    distribution: str = ""
    version: str = ""
    error: str = ""
    provides: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Plugins:
    """A loaded plugin manager and the providers of every hook."""

    manager: pluggy.PluginManager
    infos: list[PluginInfo]

    def table(self, hook: str) -> dict[str, Any]:
        """Name → factory for ``hook``; a name provided by two plugins is an error."""
        out: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for impl in reversed(getattr(self.manager.hook, hook).get_hookimpls()):
            try:
                provided = impl.function()
                if not isinstance(provided, Mapping):
                    raise TypeError(f"returned {type(provided).__name__}, not a mapping")
            except Exception as exc:  # one broken plugin must not hide the others
                log.error("plugin %s: %s failed: %s", impl.plugin_name, hook, exc)
                continue
            for name, factory in provided.items():
                if name in out:
                    raise PluginError(
                        f"{hook}: '{name}' is provided by both {owner[name]} and "
                        f"{impl.plugin_name}")
                out[name], owner[name] = factory, impl.plugin_name
        return out

    def factory(self, hook: str, name: str, what: str) -> Any:
        """The factory ``name`` for ``hook``, or PluginError listing the available ones."""
        table = self.table(hook)
        if name not in table:
            available = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {what} '{name}'; available: {available}")
        return table[name]


def _register(pm: pluggy.PluginManager, module: ModuleType | object, name: str) -> None:
    for hook in HOOKS:
        if inspect.iscoroutinefunction(getattr(module, hook, None)):
            raise PluginError(f"{hook} must be a plain function returning factories, "
                              "not 'async def'")
    if pm.get_plugin(name) is None and not pm.is_registered(module):
        pm.register(module, name=name)


def load(plugins_dir: str | None = None, autoload: bool | None = None) -> Plugins:
    """Build a plugin manager with built-ins, entry points and the plugins dir."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    for module_name in DEFAULT_PLUGINS:
        _register(pm, importlib.import_module(module_name), module_name)
        infos.append(PluginInfo(module_name, "built-in", "tooti", _version("tooti")))
    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    if autoload:
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            dist = ep.dist.name if ep.dist else ""
            info = PluginInfo(ep.name, "entry point", dist, ep.dist.version if ep.dist else "")
            infos.append(info)
            try:
                _register(pm, ep.load(), ep.name)
            except Exception as exc:  # a broken plugin must not stop the others
                info.error = f"{type(exc).__name__}: {exc}"
                log.error("plugin %s (%s) failed to load: %s", ep.name, dist, info.error)
    directory = plugins_dir if plugins_dir is not None else os.environ.get(PLUGINS_DIR_ENV)
    if directory:
        for path in sorted(Path(directory).glob("*.py")):
            info = PluginInfo(path.stem, "plugins dir", str(path))
            infos.append(info)
            try:
                _register(pm, _load_file(path), f"plugins-dir:{path.stem}")
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {exc}"
                log.error("plugin file %s failed to load: %s", path, info.error)
    result = Plugins(pm, infos)
    _describe(result)
    return result


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tooti_plugins_dir.{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _describe(plugins: Plugins) -> None:
    by_name = {info.name: info for info in plugins.infos}
    for hook in HOOKS:
        for impl in getattr(plugins.manager.hook, hook).get_hookimpls():
            key = impl.plugin_name.removeprefix("plugins-dir:")
            info = by_name.get(key)
            if info is None:
                continue
            try:
                names = sorted(impl.function() or {})
            except Exception as exc:
                info.error = info.error or f"{hook} failed: {exc}"
                continue
            info.provides[hook.removeprefix("tooti_")] = names


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


_loaded: Plugins | None = None


def get(plugins_dir: str | None = None) -> Plugins:
    """The process-wide plugins, loaded on first use."""
    global _loaded
    if _loaded is None:
        _loaded = load(plugins_dir)
    return _loaded


def reset() -> None:
    """Forget the process-wide plugins (tests, or after changing the environment)."""
    global _loaded
    _loaded = None


