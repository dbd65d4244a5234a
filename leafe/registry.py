"""Lazy registries of named plugins (environments, model backends, methods).

Entries are `module:attribute` strings imported on first use, so listing names or validating a
spec never imports heavy packages. Third-party packages add entries through the entry-point
groups `leafe.envs`, `leafe.models` and `leafe.methods`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from leafe.errors import UserError


class Registry:
    def __init__(self, kind: str, group: str, builtin: dict[str, str]):
        self.kind = kind
        self.group = group
        self._entries = dict(builtin)
        #: The names leafe itself registers (no plugins, none registered at run time).
        self.builtin = tuple(builtin)
        self._loaded: dict[str, Any] = {}
        self._plugins_scanned = False

    def _scan_plugins(self) -> None:
        if self._plugins_scanned:
            return
        self._plugins_scanned = True
        for ep in entry_points(group=self.group):
            self._entries.setdefault(ep.name, ep.value)

    def register(self, name: str, target: str | Any) -> None:
        """Register `name` as a `module:attr` string or an already-imported object."""
        if isinstance(target, str):
            self._entries[name] = target
            self._loaded.pop(name, None)
        else:
            self._entries[name] = f"{target.__module__}:{target.__qualname__}"
            self._loaded[name] = target

    def names(self) -> list[str]:
        self._scan_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._scan_plugins()
        return name in self._entries

    def get(self, name: str) -> Any:
        self._scan_plugins()
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._entries:
            raise UserError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"
            )
        module, _, attr = self._entries[name].partition(":")
        try:
            obj: Any = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (e.name == module or module.startswith(e.name + ".")):
                raise  # the plugin module itself is missing: a packaging bug, not a user error
            raise UserError(
                f"{self.kind} {name!r} needs the package {e.name!r}, which is not installed; "
                f"install leafe's extra for it (e.g. `pip install -e '.[{name}]'`)"
            ) from None
        for part in attr.split("."):
            obj = getattr(obj, part)
        self._loaded[name] = obj
        return obj
