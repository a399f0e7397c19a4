"""The plugin manager: pluggy discovery through the ``graphopt`` entry-point group, and the method registry.

Built-in methods are registered exactly as a third party's: through entry points in graphopt's own
``pyproject.toml``. ``GRAPHOPT_DISABLE_PLUGINS=name,...`` blocks entry points by name, like pytest's
``-p no:name``.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import pluggy

from graphopt import hookspecs
from graphopt.errors import PluginError
from graphopt.method import STAGES, Method, MethodInfo

_manager: pluggy.PluginManager | None = None
_registry: dict[str, MethodInfo] | None = None


def disabled_plugins() -> list[str]:
    """Entry-point names listed in ``GRAPHOPT_DISABLE_PLUGINS``."""
    return [n.strip() for n in os.environ.get("GRAPHOPT_DISABLE_PLUGINS", "").split(",") if n.strip()]


def disabled_method_plugin(method: str) -> str | None:
    """The entry point disabled by ``GRAPHOPT_DISABLE_PLUGINS`` that would register ``method``, if any: one of
    that name, or one whose module registers it (imported without registering; one that fails is skipped)."""
    blocked = set(disabled_plugins())
    points = [p for p in importlib.metadata.entry_points(group="graphopt") if p.name in blocked]
    for point in points:
        if point.name == method:
            return point.name
    for point in points:
        names: list[str] = []
        try:
            hook = getattr(point.load(), "graphopt_register_methods", None)
            if hook is not None:
                hook(register=lambda cls, names=names: names.append(getattr(cls, "name", "")))
        except Exception:
            continue
        if method in names:
            return point.name
    return None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first use with every entry point loaded."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager("graphopt")
        manager.add_hookspecs(hookspecs)
        for name in disabled_plugins():
            manager.set_blocked(name)
        _check_entry_points_import()
        manager.load_setuptools_entrypoints("graphopt")
        _manager = manager
    return _manager


def _check_entry_points_import() -> None:
    """Import every unblocked ``graphopt`` entry point first, so a broken one is named in the error."""
    blocked = set(disabled_plugins())
    for entry_point in importlib.metadata.entry_points(group="graphopt"):
        if entry_point.name in blocked:
            continue
        try:
            entry_point.load()
        except Exception as err:
            dist = entry_point.dist.metadata["name"] if entry_point.dist is not None else "?"
            raise PluginError(
                f"plugin {entry_point.name!r} (distribution {dist!r}, {entry_point.value}) failed to import: "
                f"{type(err).__name__}: {err}; fix or uninstall it, or block it with "
                f"GRAPHOPT_DISABLE_PLUGINS={entry_point.name}"
            ) from err


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object (module or instance with hookimpls) at run time; returns its name."""
    registered = get_plugin_manager().register(plugin, name=name)
    if registered is None:
        raise PluginError(f"plugin {name or plugin!r} is blocked (GRAPHOPT_DISABLE_PLUGINS)")
    reset_registry()
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under ``name``."""
    get_plugin_manager().unregister(name=name)
    reset_registry()


def reset_registry() -> None:
    """Forget the method registry; it is rebuilt from the plugins on next use."""
    global _registry
    _registry = None


def reset() -> None:
    """Forget the plugin manager too (entry points are loaded again on next use)."""
    global _manager
    _manager = None
    reset_registry()


def _distribution_names(manager: pluggy.PluginManager) -> dict[int, str]:
    return {id(plugin): dist.metadata["name"] for plugin, dist in manager.list_plugin_distinfo()}


def method_registry() -> dict[str, MethodInfo]:
    """Every registered method by name; built by calling each plugin's ``graphopt_register_methods``."""
    global _registry
    if _registry is not None:
        return _registry
    manager = get_plugin_manager()
    dists = _distribution_names(manager)
    registry: dict[str, MethodInfo] = {}
    for impl in manager.hook.graphopt_register_methods.get_hookimpls():
        plugin_label = dists.get(id(impl.plugin), impl.plugin_name)

        def register(cls: type[Method], _label: str = plugin_label, _plugin: str = impl.plugin_name) -> None:
            _check_method_class(cls, _plugin)
            if cls.name in registry:
                other = registry[cls.name].plugin
                raise PluginError(
                    f"method {cls.name!r} is registered by two plugins: {other!r} and {_label!r}; "
                    f"uninstall one or block it with GRAPHOPT_DISABLE_PLUGINS"
                )
            registry[cls.name] = MethodInfo(
                name=cls.name, stage=cls.stage, plugin=_label, options=cls.options(),
                doc=(cls.__doc__ or "").strip(), cls=cls,
            )

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as err:
            raise PluginError(
                f"plugin {impl.plugin_name!r} failed in graphopt_register_methods: {type(err).__name__}: {err}"
            ) from err
    _registry = registry
    return registry


def _check_method_class(cls: Any, plugin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not a graphopt.Method subclass")
    if not cls.name or not isinstance(cls.name, str):
        raise PluginError(f"plugin {plugin!r}: method class {cls.__name__} has no `name`")
    if cls.stage not in STAGES:
        raise PluginError(f"plugin {plugin!r}: method {cls.name!r} has stage {cls.stage!r}; use one of {STAGES}")


def call_hook(name: str, after: str = "", first_result: bool = False, **kwargs: Any) -> Any:
    """Call every plugin's implementation of hook ``name`` (pluggy's order: the last registered first; with
    ``first_result``, until one returns something else than None, which is returned). An exception becomes a
    ``PluginError`` naming the plugin and the hook, ``after`` saying what already happened (the step applied)."""
    manager = get_plugin_manager()
    for impl in reversed(getattr(manager.hook, name).get_hookimpls()):
        try:
            result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except Exception as err:
            raise PluginError(f"plugin {impl.plugin_name!r} failed in {name}{after}: {type(err).__name__}: "
                              f"{err}") from err
        if first_result and result is not None:
            return result
    return None


def list_methods() -> dict[str, MethodInfo]:
    """Every registered method, built-in and third-party, by name."""
    return dict(method_registry())


def plugin_of(method: Method) -> str:
    """The plugin (distribution) name that registered ``method``'s class, for error messages."""
    info = method_registry().get(method.name)
    return info.plugin if info is not None and info.cls is type(method) else type(method).__module__
