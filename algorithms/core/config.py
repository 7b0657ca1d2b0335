"""A method's settings as a frozen, typed config generated from its declarations
(`hparams()`: name -> HParam(default, sample), algorithms/core/hparams.py), and the one
function that builds and checks it for every caller (DomainBed, Dassl, the CoOp
protocols, the demo):

    cfg = build_config(CLIPood, {"margin_alpha": 0.2}, where="--hparams for CLIPood")
    cfg.margin_alpha        # 0.2; every other field its declared default
    cfg.lr = 1.0            # dataclasses.FrozenInstanceError

A field's type is its default's (bool, int, float, str; a float field takes an integer
and holds it as a float). Unknown keys and values of another type are refused with one
line that starts with `where` (`check_values`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

from algorithms.core.hparams import check_overrides


def field_type(default) -> type:
    return type(default) if default is not None else object


def config_class(method_cls) -> type:
    """The frozen dataclass `<Name>Config` of a method's declared hyperparameters
    (made once per class)."""
    cached = method_cls.__dict__.get("_config_class")
    if cached is not None:
        return cached
    fields = [(name, field_type(hp.default), dataclasses.field(default=hp.default))
              for name, hp in method_cls.hparams().items()]
    cls = dataclasses.make_dataclass(f"{method_cls.__name__}Config", fields, frozen=True)
    cls.__module__ = method_cls.__module__
    method_cls._config_class = cls
    return cls


def defaults(method_cls) -> Dict[str, Any]:
    return {name: hp.default for name, hp in method_cls.hparams().items()}


def check_values(method_cls, values: Mapping, where: str) -> None:
    """ValueError (one line, starting with `where`) when `values` names a key the method
    does not declare or gives a value of another JSON type than its default's."""
    check_overrides(dict(values), defaults(method_cls), where)


def _typed(default, value):
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def build_config(method_cls, values: Mapping | None = None, where: str | None = None):
    """The method's config: declared defaults, overridden by `values` (checked)."""
    values = dict(values or {})
    check_values(method_cls, values, where or f"{method_cls.name}'s hyperparameters")
    declared = defaults(method_cls)
    return config_class(method_cls)(**{k: _typed(declared[k], v) for k, v in values.items()})


def as_dict(cfg) -> Dict[str, Any]:
    """The config's values by name (JSON-serialisable: what records hold)."""
    return dataclasses.asdict(cfg)
