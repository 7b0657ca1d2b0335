"""The recipe book (recipes/recipes.yaml): per-dataset, per-protocol and per-model values
of the harness's methods, each with its source, asked by the DomainBed adapter, the
Dassl adapter, the CoOp protocols runner and the demo.

    recipes.values("CLIPood", "domainbed", "OfficeHomeOpen")  # {"lr": 3e-06, ...}
    recipes.recipe("CLIPood", "domainbed", "OfficeHomeOpen")  # {key: Value(value, source, search)}
    recipes.coop_protocols()                                  # the CoOp protocols' settings

Harnesses: domainbed, dassl, tiny, demo (the demo asks for tiny, then demo). Values of a
method's declared hyperparameters are checked against the declaration (name and type);
DomainBed's own `batch_size` and the reference's `steps` are the only other keys.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

BOOK = Path(__file__).resolve().parent / "recipes.yaml"
HARNESSES = ("domainbed", "dassl", "tiny", "demo")
DOMAINBED_KEYS = ("batch_size", "steps")  # not method hyperparameters (see the book)
ENTRY_FIELDS = {"methods", "trains", "harness", "datasets", "values", "search", "source"}


@dataclass(frozen=True)
class Value:
    value: object
    source: str
    search: Optional[Tuple] = None  # random-search choices (DomainBed's batch_size)


def read_book(path: Path = BOOK) -> dict:
    """The book at `path`, checked for its fields (read again when the file changed)."""
    stat = Path(path).stat() if Path(path).is_file() else None
    return _read_book(Path(path), stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _read_book(path: Path, version) -> dict:
    from common import cli
    book = cli.read_yaml_mapping(path, "recipe book")
    for i, entry in enumerate(book.get("entries") or [], start=1):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict) or set(entry) - ENTRY_FIELDS:
            raise ValueError(f"{where}: fields must be among {sorted(ENTRY_FIELDS)}")
        if entry.get("harness") not in HARNESSES:
            raise ValueError(f"{where}: harness {entry.get('harness')!r} not in {HARNESSES}")
        if not entry.get("source"):
            raise ValueError(f"{where}: no source")
        if ("methods" in entry) == ("trains" in entry):
            raise ValueError(f"{where}: give either `methods` or `trains`")
    return book


def _applies(entry: dict, method: str, harness: str, dataset: Optional[str]) -> bool:
    if entry["harness"] != harness:
        return False
    if "methods" in entry:
        if method not in entry["methods"]:
            return False
    else:
        from algorithms.core import registry
        method_cls = registry.methods().get(method)
        if method_cls is None or bool(method_cls.trains) != bool(entry["trains"]):
            return False
    datasets = entry.get("datasets")
    return datasets is None or dataset in datasets


def recipe(method: str, harness: str, dataset: Optional[str] = None,
           path: Path = BOOK) -> Dict[str, Value]:
    """{key: Value} the book sets for `method` in `harness` (on `dataset`), later entries
    winning."""
    if harness not in HARNESSES:
        raise ValueError(f"recipe: harness {harness!r} not in {HARNESSES}")
    checked(path)
    found: Dict[str, Value] = {}
    for entry in read_book(path).get("entries") or []:
        if _applies(entry, method, harness, dataset):
            search = entry.get("search") or {}
            for key, value in (entry.get("values") or {}).items():
                choices = tuple(search[key]) if key in search else (
                    found[key].search if key in found else None)
                found[key] = Value(value, str(entry["source"]).strip(), choices)
    return found


def values(method: str, harness: str, dataset: Optional[str] = None,
           path: Path = BOOK) -> dict:
    """{key: value} of `recipe`."""
    return {k: v.value for k, v in recipe(method, harness, dataset, path).items()}


def method_values(method: str, harness: str, dataset: Optional[str] = None,
                  path: Path = BOOK) -> dict:
    """The book's values of the method's declared hyperparameters only."""
    return {k: v for k, v in values(method, harness, dataset, path).items()
            if k not in DOMAINBED_KEYS}


def checked(path: Path = BOOK) -> None:
    """`check` once per version of the book (every harness asks through `recipe`)."""
    stat = Path(path).stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CHECKED:
        check(path)
        _CHECKED.add(key)


_CHECKED: set = set()


def check(path: Path = BOOK) -> None:
    """ValueError (one line naming the entry) when an entry names an unknown method or sets
    a key its methods do not declare (DomainBed's `batch_size` and `steps` aside) or a
    value of another type than the declared default's."""
    from algorithms.core import registry
    from algorithms.core.config import check_values
    methods = registry.methods()
    for i, entry in enumerate(read_book(path).get("entries") or [], start=1):
        where = f"{path}: entry {i}"
        names = entry.get("methods") or [n for n, m in methods.items()
                                          if bool(m.trains) == bool(entry["trains"])]
        for name in names:
            if name not in methods:
                raise ValueError(f"{where}: unknown method {name!r}; known: {', '.join(methods)}")
            given = dict(entry.get("values") or {})
            if entry["harness"] in ("domainbed", "demo"):
                for key in DOMAINBED_KEYS:
                    if key in given and not isinstance(given.pop(key), int):
                        raise ValueError(f"{where}: {key} must be an integer")
            check_values(methods[name], given, f"{where} ({name})")


def coop_protocols(path: Path = BOOK) -> dict:
    """{trainer: settings} of CoOp's protocols (the book's `coop_protocols`)."""
    return dict(read_book(path).get("coop_protocols") or {})
