"""Hyperparameters declared once (default + random-search distribution), used by both
the DomainBed registry and the Dassl config tree.

A method declares them in its `hparams(dataset)`: name -> HParam(default, sample)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import numpy as np


@dataclass(frozen=True)
class HParam:
    default: Any
    sample: Callable[[np.random.RandomState], Any]  # must return a JSON-serialisable value


def fixed(value) -> HParam:
    return HParam(value, lambda r: value)


def log_uniform(default: float, low_exp: float, high_exp: float) -> HParam:
    return HParam(default, lambda r: float(10 ** r.uniform(low_exp, high_exp)))


def choice(default, options) -> HParam:
    return HParam(default, lambda r: options[int(r.randint(len(options)))])


HParams = Dict[str, HParam]
