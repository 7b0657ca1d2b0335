"""Unknown DomainBed algorithm and dataset names: an error naming the known ones.

Upstream's train.py raises a bare NotImplementedError for an unknown dataset (after
building hyperparameters for it) and `get_algorithm_class` / `get_dataset_class` name
the unknown one only. The registry's `default_hparams` / `random_hparams` (train.py's
first use of both names) and both lookups now say which names exist. The error type
stays upstream's NotImplementedError."""
from __future__ import annotations

import difflib


def unknown(kind: str, name, known) -> str:
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown DomainBed {kind} {name!r}{hint}; known: {', '.join(known)}"


def check_names(algorithm, dataset) -> None:
    import domainbed.algorithms
    import domainbed.datasets
    if algorithm not in vars(domainbed.algorithms):
        raise NotImplementedError(unknown("algorithm", algorithm, domainbed.algorithms.ALGORITHMS))
    if dataset not in vars(domainbed.datasets):
        raise NotImplementedError(unknown("dataset", dataset, domainbed.datasets.DATASETS))


def patch_hparams_registry(module) -> None:
    for name in ("default_hparams", "random_hparams"):
        upstream = getattr(module, name)

        def checked(algorithm, dataset, *args, _upstream=upstream):
            check_names(algorithm, dataset)
            return _upstream(algorithm, dataset, *args)

        checked.__name__ = checked.__qualname__ = name
        checked.__doc__ = upstream.__doc__
        setattr(module, name, checked)


def patch_lookup(module, function: str, kind: str, names: str) -> None:
    """module.<function>(name) (get_algorithm_class, get_dataset_class) lists the
    known names (module.<names>) when upstream's lookup would fail."""
    upstream = getattr(module, function)

    def lookup(name):
        if name not in vars(module):
            raise NotImplementedError(unknown(kind, name, getattr(module, names)))
        return upstream(name)

    lookup.__name__ = lookup.__qualname__ = function
    lookup.__doc__ = upstream.__doc__
    setattr(module, function, lookup)
