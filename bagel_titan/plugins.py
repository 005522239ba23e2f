"""Plugin manager and registries.

Plugins are discovered through the entry-point group ``bagel_titan`` and the modules named in
``[job] plugins``; each registry hook's objects are filed by name (see `hookspec.py`).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, TypeVar

import pluggy
from typing_extensions import get_protocol_members

from bagel_titan import hookspec
from bagel_titan.errors import UserError
from bagel_titan.hookspec import PROJECT
from bagel_titan.protocols import (
    AttentionBackend,
    DataloaderBuilder,
    DatasetReader,
    LossComponentFactory,
    ModelSpec,
    PackingStrategy,
)

T = TypeVar("T")


class PluginError(UserError):
    """A plugin could not be loaded, or two plugins clash."""


class UnknownNameError(UserError, KeyError):
    """A name in the config that no plugin registered."""

    __str__ = UserError.__str__  # KeyError quotes its message; we want it plain


@dataclass
class Registry(Generic[T]):
    """Named objects of one kind (`T`: their Protocol), each remembered with the plugin that
    registered it."""

    kind: str
    """What the objects are, for messages ("attention backend")."""
    config_key: str
    """The config key that selects one ("[attention] backend")."""
    contract: type | None = None
    """The Protocol class of `T` (`bagel_titan.protocols`): an object lacking one of its members
    is refused when it is registered, not when the run first needs the member."""
    entries: dict[str, tuple[T, str]] = field(default_factory=dict)

    def register(self, name: str, obj: T, plugin: str) -> None:
        if self.contract is not None:
            # Plugin objects come from other packages, untyped: check the contract once, here.
            missing = sorted(m for m in get_protocol_members(self.contract) if not hasattr(obj, m))
            if missing:
                raise PluginError(
                    f"the {self.kind} {name!r} of plugin {plugin!r} lacks {', '.join(missing)}; "
                    f"subclass bagel_titan.protocols.{self.contract.__name__}, which gives the "
                    f"optional members their defaults"
                )
        if name in self.entries:
            other = self.entries[name][1]
            raise PluginError(
                f"two plugins register the {self.kind} {name!r}: {other!r} and {plugin!r}; "
                f"uninstall one or remove it from [job] plugins"
            )
        self.entries[name] = (obj, plugin)

    def get(self, name: str) -> T:
        if name not in self.entries:
            known = ", ".join(sorted(self.entries)) or "(none)"
            close = difflib.get_close_matches(name, list(self.entries), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r} in {self.config_key}{hint} registered: {known}"
            )
        return self.entries[name][0]

    def plugin_of(self, name: str) -> str:
        return self.entries[name][1]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries


class PluginManager:
    """Loads plugins and fills the registries from their hooks."""

    def __init__(self, extra_modules: Iterable[str] = (), load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspec)
        if load_entry_points:
            self.pm.load_setuptools_entrypoints(PROJECT)
        for module_name in extra_modules:
            self.load_module(module_name)
        self.model_specs: Registry[ModelSpec[Any, Any]] = Registry("model spec", "[model] name", ModelSpec)
        self.attention_backends: Registry[AttentionBackend] = Registry(
            "attention backend", "[attention] backend", AttentionBackend
        )
        self.dataset_readers: Registry[DatasetReader] = Registry(
            "dataset reader", "[[data.datasets]] format", DatasetReader
        )
        self.packing_strategies: Registry[PackingStrategy] = Registry(
            "packing strategy", "[data] packing_strategy", PackingStrategy
        )
        self.loss_components: Registry[LossComponentFactory] = Registry(
            "loss component", "[loss] components", LossComponentFactory
        )
        self.dataloaders: Registry[DataloaderBuilder] = Registry(
            "dataloader", "[data] loader", DataloaderBuilder
        )
        self.config_sections: Registry[type] = Registry("config section", "the TOML file")
        self._collect()

    def load_module(self, module_name: str) -> None:
        if self.pm.has_plugin(module_name):
            return
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise PluginError(
                f"cannot import plugin module {module_name!r} named in [job] plugins: {exc}; "
                f"check the name and that its package is installed"
            ) from exc
        if any(self.pm.get_name(p) == module_name for p in self.pm.get_plugins()):
            return
        if self.pm.is_registered(module):
            return
        self.pm.register(module, name=module_name)

    def _each(self, hook_name: str) -> Iterable[tuple[str, Any]]:
        """(plugin name, result) for every implementation of a registry hook."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):  # registration order
            result = impl.function()
            if result is not None:
                yield impl.plugin_name, result

    def _collect(self) -> None:
        def fill(registry: Registry[Any], hook_name: str, key: Callable[[Any], str]) -> None:
            for plugin, objects in self._each(hook_name):
                for obj in objects:
                    registry.register(key(obj), obj, plugin)

        fill(self.model_specs, "bagel_titan_model_specs", lambda o: o.name)
        fill(self.attention_backends, "bagel_titan_attention_backends", lambda o: o.name)
        fill(self.dataset_readers, "bagel_titan_dataset_readers", lambda o: o.format)
        fill(self.packing_strategies, "bagel_titan_packing_strategies", lambda o: o.name)
        fill(self.loss_components, "bagel_titan_loss_components", lambda o: o.name)
        fill(self.dataloaders, "bagel_titan_dataloaders", lambda o: o.name)
        for plugin, sections in self._each("bagel_titan_config_sections"):
            for name, section_type in sections.items():
                self.config_sections.register(name, section_type, plugin)

    @property
    def hook(self) -> pluggy.HookRelay:
        """Call lifecycle hooks: ``manager.hook.bagel_titan_on_step_end(...)``."""
        return self.pm.hook

    def reader_for_path(self, path: str) -> DatasetReader:
        """The reader whose extensions match `path` (when a dataset omits `format`)."""
        for name in self.dataset_readers.names():
            reader = self.dataset_readers.get(name)
            if path.endswith(tuple(reader.extensions)):
                return reader
        known = {n: list(self.dataset_readers.get(n).extensions) for n in self.dataset_readers.names()}
        raise UnknownNameError(
            f"cannot infer the format of dataset path {path!r} from its extension; set `format` "
            f"in its [[data.datasets]] entry to one of {self.dataset_readers.names()} "
            f"(extensions: {known})"
        )


_MANAGERS: dict[tuple[str, ...], PluginManager] = {}


def get_plugin_manager(extra_modules: Iterable[str] = ()) -> PluginManager:
    """A process-wide manager per set of extra modules (entry points are scanned once)."""
    key = tuple(extra_modules)
    if key not in _MANAGERS:
        _MANAGERS[key] = PluginManager(key)
    return _MANAGERS[key]
