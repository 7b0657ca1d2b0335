"""Hyperparameters declared once (default + random-search distribution), used by both
the DomainBed registry and the Dassl config tree.

A method declares them in its `hparams()`: name -> HParam(default, sample); its typed
config is generated from them (algorithms/core/config.py).
The helpers below (`fixed`, `log_uniform`, `uniform`, `choice`) make samplers that also
declare their range (`HParam.in_range`), which tests/test_properties.py checks every
draw against; a hand-written `sample` declares none. `check_overrides` is the one check
of user-given values (DomainBed's `--hparams`): unknown keys and wrong JSON types."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np


@dataclass(frozen=True)
class HParam:
    default: Any
    sample: Callable[[np.random.RandomState], Any]  # must return a JSON-serialisable value

    @property
    def fixed(self) -> bool:
        """Not searched: every draw is the default."""
        return isinstance(self.sample, _Fixed)

    def in_range(self, value) -> Optional[bool]:
        """Whether `value` is a draw the sampler declares; None when it declares no range."""
        contains = getattr(self.sample, "contains", None)
        return None if contains is None else contains(value)


@dataclass(frozen=True)
class _Fixed:
    value: Any

    def __call__(self, r):
        return self.value

    def contains(self, value) -> bool:
        return value == self.value


@dataclass(frozen=True)
class _Interval:
    """float(r.uniform(low, high)), or float(10 ** r.uniform(low, high)) when `log`."""
    low: float
    high: float
    log: bool = False

    def __call__(self, r):
        x = r.uniform(self.low, self.high)
        return float(10 ** x if self.log else x)

    def contains(self, value) -> bool:
        lo, hi = (10 ** self.low, 10 ** self.high) if self.log else (self.low, self.high)
        slack = 1e-12 * max(abs(lo), abs(hi))  # 10 ** x rounds
        return (isinstance(value, float) and math.isfinite(value)
                and lo - slack <= value <= hi + slack)


@dataclass(frozen=True)
class _Choice:
    options: tuple

    def __call__(self, r):
        return self.options[int(r.randint(len(self.options)))]

    def contains(self, value) -> bool:
        return any(type(value) is type(o) and value == o for o in self.options)


def fixed(value) -> HParam:
    return HParam(value, _Fixed(value))


def log_uniform(default: float, low_exp: float, high_exp: float) -> HParam:
    return HParam(default, _Interval(low_exp, high_exp, log=True))


def uniform(default: float, low: float, high: float) -> HParam:
    return HParam(default, _Interval(low, high))


def choice(default, options) -> HParam:
    return HParam(default, _Choice(tuple(options)))


def dassl_sgd(lr: float = 2e-3, low_exp: float = -3.5, high_exp: float = -2.0) -> HParams:
    """Dassl's SGD as the CoOp-family configs set it: lr searched log-uniformly in
    [10^low_exp, 10^high_exp], momentum 0.9, weight decay 5e-4."""
    return {"lr": log_uniform(lr, low_exp, high_exp), "momentum": fixed(0.9),
            "weight_decay": fixed(5e-4)}


# --- user-given values ----------------------------------------------------------------

def json_type(value) -> str:
    """The JSON type of a value, as an error message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def accepts(default, value) -> bool:
    """Whether `value` has the JSON type of `default` (an integer is a number too; a
    null default takes anything)."""
    if default is None:
        return True
    expected, given = json_type(default), json_type(value)
    return given == expected or (expected == "a number" and given == "an integer")


def check_overrides(overrides, defaults: dict, where: str) -> None:
    """ValueError (one line, starting with `where`) when `overrides` is not a JSON object,
    names a key that `defaults` does not know (the message lists the known ones) or
    gives a value of another JSON type than the default's."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: expected a JSON object of hyperparameters, "
                         f"got {json_type(overrides)}")
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        named = [k if isinstance(k, str) and k.isprintable() else repr(k) for k in unknown]
        raise ValueError(f"{where}: unknown hyperparameter{'s' * (len(unknown) > 1)} "
                         f"{', '.join(named)}; known: {', '.join(sorted(defaults))}")
    for key, value in overrides.items():
        if not accepts(defaults[key], value):
            raise ValueError(f"{where}: {key} must be {json_type(defaults[key])} "
                             f"(default {defaults[key]!r}), got {json_type(value)} {value!r}")


# Numerical precision of a method's encoder forwards (training step and evaluation):
# "auto" = bf16 autocast on a CUDA device with native bf16, fp16 autocast with gradient
# scaling on one without, fp32 elsewhere (CPU). The policy: algorithms/core/method.py.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def precision(default: str = "auto") -> HParam:
    """The `precision` hyperparameter every method declares (not searched)."""
    if default not in PRECISIONS:
        raise ValueError(f"precision {default!r} not in {PRECISIONS}")
    return fixed(default)


HParams = Dict[str, HParam]
