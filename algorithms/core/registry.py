"""Methods are discovered, not listed: every module and sub-package directly in
`algorithms/` (but `core` and `backbone`, the machinery) is imported once and each class
decorated with `@register_method` there is a method, under its `name`. Adding a method
is adding one such file (or one package whose `__init__` imports its method)."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict

_METHODS: Dict[str, type] = {}
_discovered = False
MACHINERY = ("core", "backbone")  # sub-packages that hold no method


def register_method(cls):
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise KeyError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def discover() -> None:
    """Import every module and method package of the `algorithms` package."""
    global _discovered
    if _discovered:
        return
    import algorithms
    for info in pkgutil.iter_modules(algorithms.__path__):
        if info.name not in MACHINERY:
            importlib.import_module(f"algorithms.{info.name}")
    _discovered = True


def methods() -> Dict[str, type]:
    discover()
    return dict(_METHODS)


def get_method(name: str):
    known = methods()
    if name not in known:
        raise KeyError(f"unknown method {name!r}; known: {sorted(known)}")
    return known[name]
