"""The one protocol for methods that choose something on held-out data (CALIP's betas).

Vocabulary, the same in both harnesses:
- "validation": what the harness's model selection may see. DomainBed: the training
  environments' held-out (out) splits; Dassl: the val split (where a dataset's val is its
  test split, as CoOp's ImageNet, up to 16 training images per class instead).
- "test": the test data itself. A method that selects on it is an oracle
  (`method.oracle`), and its name must say so in every table.

A method declares `selects_on = "validation" | "test"` and implements
`select(batches, data_key) -> dict`; `run` calls it once with the data the adapter
provides. `data_key` describes the data (dataset, split, images, transform) so that a
method can cache what it computes on it.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

VALIDATION = "validation"
TEST = "test"
KINDS = (VALIDATION, TEST)

# adapter-specific: which -> (batches of (images, labels), data_key, split name) or None
DataProvider = Callable[[str], Optional[Tuple[Iterable, dict, str]]]


def check_declaration(method_cls) -> None:
    if method_cls.selects_on not in (None, *KINDS):
        raise ValueError(f"{method_cls.name}: selects_on={method_cls.selects_on!r}, "
                         f"expected None or one of {KINDS}")
    if method_cls.selects_on is not None and not callable(getattr(method_cls, "select", None)):
        raise TypeError(f"{method_cls.name}: selects_on is set but it has no select()")


def run(method, provide: DataProvider, warn: Callable[[str], None] = print) -> dict:
    """Let `method` select on the data it declared; {} when it selects on nothing.
    The returned summary (what was chosen, on which split) goes into the run's record."""
    which = getattr(method, "selects_on", None)
    if which is None:
        return {}
    data = provide(which)
    if data is None:
        warn(f"{method.name}: no {which} data here: nothing selected, "
             f"the declared defaults are used")
        return {}
    batches, data_key, split = data
    summary = dict(method.select(batches, data_key=data_key) or {})
    summary["split"] = split
    return summary
