"""Method registry: `@register_method` next to each method class; `get_method(name)`."""
from __future__ import annotations

import importlib
from typing import Dict

METHOD_MODULES = (
    "algorithms.zsclip",
    "algorithms.finetune",
    "algorithms.clipood",
    "algorithms.alignclip",
    "algorithms.linear_probe",
    "algorithms.calip",
)
_METHODS: Dict[str, type] = {}


def register_method(cls):
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise KeyError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def methods() -> Dict[str, type]:
    for module in METHOD_MODULES:
        importlib.import_module(module)
    return dict(_METHODS)


def get_method(name: str):
    known = methods()
    if name not in known:
        raise KeyError(f"unknown method {name!r}; known: {sorted(known)}")
    return known[name]
