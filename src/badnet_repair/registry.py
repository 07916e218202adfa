"""One registry shape for every kind of plug-in (repairs, detectors): a package whose
modules are the choices, discovered by name, so a new plug-in is a new file and a new
config, never an edit to a list."""

import importlib
import pkgutil
from types import ModuleType


class Registry:
    def __init__(self, package: str, path: list[str]) -> None:
        self.package, self.path = package, path

    def names(self) -> list[str]:
        """Every plug-in, by module name (modules starting with _ are helpers)."""
        return sorted(m.name for m in pkgutil.iter_modules(self.path) if m.name[0] != "_")

    def module(self, name: str) -> ModuleType:
        return importlib.import_module(f"{self.package}.{name}")
