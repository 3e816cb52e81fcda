"""The plugin manager: loads plugins from the ``klgap`` entry-point group and fills the registries.

Built-in plugins (``plugins/``) arrive exactly like third-party ones, through entry points.
``KLGAP_DISABLE_PLUGINS=a,b`` skips the named entry points (e.g. a broken third-party plugin). The core's own
plugins (:data:`CORE_PLUGINS`: klgap's report sections) are registered first, always.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

import pluggy

from klgap import __version__, hookspecs
from klgap.errors import KlgapError, PluginError, unknown

ENTRY_POINT_GROUP = hookspecs.PROJECT
#: plugin name -> module of the core's own plugins, registered before any entry point and never disabled
CORE_PLUGINS = {"report_sections": "klgap.report.builtin_sections"}


@dataclass
class Entry:
    """One registered thing: its name, object, description and the plugin that registered it."""

    name: str
    obj: Any
    description: str
    plugin: str


@dataclass
class Registry:
    """Name -> Entry for one kind (model, sae_loader, perturbation, token_source)."""

    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, plugin: str, name: str, obj: Any, description: str | None = None) -> None:
        if not isinstance(name, str) or not name or any(c.isspace() or c in ":,=" for c in name):
            raise PluginError(
                f"plugin {plugin!r} tried to register {self.kind} {name!r}: a name must be a non-empty "
                "string without spaces, ':', ',' or '='"
            )
        if name in self.entries:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {self.entries[name].plugin!r} "
                f"and by plugin {plugin!r}"
            )
        if description is None:
            description = (getattr(obj, "description", None) or inspect.getdoc(obj) or "").split("\n")[0]
        self.entries[name] = Entry(name, obj, description, plugin)

    def get(self, name: str) -> Any:
        """The object registered as `name`, or an error listing the valid names."""
        if name not in self.entries:
            raise unknown(self.kind.replace("_", " "), name, self.entries)
        return self.entries[name].obj

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries


@dataclass
class PluginInfo:
    """What `klgap plugins` shows for one plugin."""

    name: str
    package: str | None
    version: str | None
    registers: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None  # a broken plugin: why (it registers nothing)


class PluginHost:
    """The pluggy manager plus the registries it filled."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.dists: dict[str, tuple[str | None, str | None]] = {}
        self.broken: dict[str, str] = {}  # plugin -> why it failed to load or to register (klgap plugins lists it)
        self._registries: dict[str, Registry] | None = None  # before loading: a plugin may be marked broken then
        for name, module in CORE_PLUGINS.items():
            self.add_plugin(import_module(module), name, package="klgap", version=__version__)
        if load_entry_points:
            self._load_entry_points()

    # -- loading -----------------------------------------------------------------------------

    def _load_entry_points(self) -> None:
        disabled = {s.strip() for s in os.environ.get("KLGAP_DISABLE_PLUGINS", "").split(",") if s.strip()}
        seen: set[str] = set()
        available = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        for name in sorted(disabled - {ep.name for ep in available}):
            raise PluginError(str(unknown("plugin", name, {ep.name for ep in available})).replace(
                "unknown plugin", "KLGAP_DISABLE_PLUGINS names an unknown plugin", 1))
        for ep in available:
            if ep.name in disabled or ep.name in seen:
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - reported by name, not as a traceback
                self.mark_broken(ep.name, f"plugin {ep.name!r} (package {package or '?'}, entry point {ep.value!r}) "
                                          f"failed to load: {type(exc).__name__}: {exc}", package, version)
                continue
            try:
                self.add_plugin(plugin, ep.name, package=package, version=version)
            except PluginError as exc:
                self.mark_broken(ep.name, str(exc), package, version)

    def add_plugin(self, plugin: Any, name: str, package: str | None = None, version: str | None = None) -> None:
        """Register a plugin object (module or instance) by name; tests use this directly."""
        if self.pm.has_plugin(name):
            raise PluginError(f"two plugins are named {name!r}; plugin names must be unique")
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            raise PluginError(f"plugin {name!r} is not a valid klgap plugin: {exc}") from exc
        self.dists[name] = (package, version)
        self._registries = None

    def mark_broken(self, name: str, why: str, package: str | None = None, version: str | None = None) -> None:
        """Record a plugin that failed to load or to register: `klgap plugins` lists it with `why`, every other
        command refuses to run (:meth:`check`) until it is fixed or skipped with KLGAP_DISABLE_PLUGINS."""
        self.broken.setdefault(name, f"{why.rstrip('.')}. Set KLGAP_DISABLE_PLUGINS={name} to skip it.")
        if name not in self.dists:
            self.dists[name] = (package, version)
        if self._registries is not None:
            for registry in self._registries.values():
                registry.entries = {k: e for k, e in registry.entries.items() if e.plugin != name}

    def check(self) -> None:
        """Raise the first broken plugin's error (what every command but `klgap plugins` does)."""
        self.registries  # registering may break a plugin too
        if self.broken:
            name, why = next(iter(self.broken.items()))
            more = f" ({len(self.broken) - 1} more broken: {', '.join(list(self.broken)[1:])})" if len(self.broken) > 1 else ""
            raise PluginError(f"{why}{more}")

    def remove_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.dists.pop(name, None)
        self._registries = None

    # -- registries ----------------------------------------------------------------------------

    @property
    def registries(self) -> dict[str, Registry]:
        if self._registries is None:
            self._registries = self._collect()
        return self._registries

    def _collect(self) -> dict[str, Registry]:
        registries = {kind: Registry(kind) for kind in hookspecs.REGISTRY_HOOKS.values()}
        for hook_name, kind in hookspecs.REGISTRY_HOOKS.items():
            hook = getattr(self.pm.hook, hook_name)
            # Call each implementation separately so every registration is attributed to its plugin
            # and a plugin that raises is reported by name.
            for impl in reversed(hook.get_hookimpls()):
                registry = registries[kind]

                def register(name: str, obj: Any, description: str | None = None, *, _p=impl.plugin_name, _r=registry) -> None:
                    _r.add(_p, name, obj, description)

                kwargs = {"register": register}
                try:
                    impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
                except PluginError as exc:
                    self.broken.setdefault(impl.plugin_name, f"{exc}. Set KLGAP_DISABLE_PLUGINS={impl.plugin_name} "
                                                             "to skip it.")
                except Exception as exc:  # noqa: BLE001
                    self.broken.setdefault(impl.plugin_name, f"plugin {impl.plugin_name!r} raised in {hook_name}: "
                                           f"{type(exc).__name__}: {exc}. Set KLGAP_DISABLE_PLUGINS="
                                           f"{impl.plugin_name} to skip it.")
        for registry in registries.values():  # a broken plugin registers nothing
            registry.entries = {k: e for k, e in registry.entries.items() if e.plugin not in self.broken}
        return registries

    def registry(self, kind: str) -> Registry:
        """The registry of `kind`; a PluginError while any plugin is broken (:meth:`check`)."""
        self.check()
        return self.registries[kind]

    def plugin_infos(self) -> list[PluginInfo]:
        """Every plugin with what it registers, broken ones with their error (never raises for them)."""
        registries = self.registries
        infos = {name: PluginInfo(name, *self.dists.get(name, (None, None))) for name, _ in self.pm.list_name_plugin()}
        for name, why in self.broken.items():
            infos[name] = PluginInfo(name, *self.dists.get(name, (None, None)), error=why)
        for kind, registry in registries.items():
            for entry in registry.entries.values():
                infos.setdefault(entry.plugin, PluginInfo(entry.plugin, None, None))
                infos[entry.plugin].registers.setdefault(kind, []).append(entry.name)
        return sorted(infos.values(), key=lambda i: i.name)


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host (entry points loaded once)."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost()
    return _HOST


def reset_host() -> None:
    """Forget the cached host, e.g. after installing a plugin package in a test."""
    global _HOST
    _HOST = None


def registry(kind: str) -> Registry:
    """Shortcut: ``registry("perturbation").get("sae")``."""
    return get_host().registry(kind)


@dataclass(frozen=True)
class ModelRef:
    """What a ``--model`` value resolved to: the model's name in reports, its adapter, the plugin behind it."""

    name: str
    adapter: Any  # klgap.protocols.ModelAdapter
    plugin: str


def model_adapter(spec: str) -> ModelRef:
    """The adapter of a ``--model`` value: a registered name, else whatever a plugin's
    ``resolve_model_adapter`` makes of it (a hub repo id, a local folder); else the 'unknown model' error."""
    host = get_host()
    models = host.registry("model")
    if spec in models:
        entry = models.entries[spec]
        return ModelRef(spec, entry.obj, entry.plugin)
    for impl in reversed(host.pm.hook.resolve_model_adapter.get_hookimpls()):
        adapter = impl.function(spec=spec)
        if adapter is not None:
            return ModelRef(str(getattr(adapter, "name", spec)), adapter, impl.plugin_name)
    error = unknown("model", spec, models.entries)
    if host.pm.hook.resolve_model_adapter.get_hookimpls():
        error = KlgapError(f"{error}; or a hub repo id (ORG/NAME) or a folder saved with save_pretrained")
    raise error
