"""Run a function right after a module is imported (now, if it already is): how the integrations reach a
library's functions without importing the library themselves."""
from __future__ import annotations

import importlib.abc
import sys


def after_import(name: str, hook) -> None:
    """`hook(module)` once `name` is executed, before its importer binds names from it."""
    if name in sys.modules:
        hook(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, hook))


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name, hook):
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot: the module is imported once
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                _run_after(spec.loader, self.hook)
                return spec
        return None


def _run_after(loader, hook) -> None:
    exec_module = loader.exec_module

    def exec_then_hook(module):
        exec_module(module)
        hook(module)

    loader.exec_module = exec_then_hook
