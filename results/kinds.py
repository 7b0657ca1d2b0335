"""Record kinds: what a kind of result record looks like on disk and how it becomes tables.

The collector walks the given folders once and hands every file whose name matches a
kind's `patterns` to that kind. A kind is a `Kind` subclass registered with `@register`
in a module `results/kind_<name>.py`; such modules are found and imported by `kinds()`,
so adding a kind (zero-shot, retrieval, modality gap, ...) is adding one module:

    from results.kinds import Kind, register

    @register
    class ZeroShot(Kind):
        name = "zeroshot"
        patterns = ("zeroshot.json",)

        def load(self, paths):            # -> records (falsy when there are none)
            ...
        def tables(self, records, refs):  # -> list of results.tables.Table
            ...
        # optional: def figures(self, records, tables, out_dir) -> list of PNG paths
"""
from __future__ import annotations

import fnmatch
import importlib
import os
import pkgutil
from pathlib import Path

import results
from results import figures

_KINDS: dict[str, "Kind"] = {}


class Kind:
    name = ""
    patterns: tuple[str, ...] = ()  # file-name patterns (fnmatch) of this kind's files

    def load(self, paths):
        """Read the matched files; return the kind's records (falsy when none)."""
        raise NotImplementedError

    def tables(self, records, refs) -> list:
        """Tables from the loaded records; `refs` are results.reference.Ref rows."""
        raise NotImplementedError

    def figures(self, records, tables, out_dir) -> list[Path]:
        """PNG figures beside the tables; by default a bar chart per table that names a
        `figure_column`. Kinds with richer figures (attention overlays, embedding
        projections) override this."""
        return figures.bar_charts(tables, out_dir)


def register(cls):
    """Class decorator: make a Kind subclass known to the collector."""
    if not cls.name or not cls.patterns:
        raise ValueError(f"{cls.__name__}: a kind needs a name and file-name patterns")
    _KINDS[cls.name] = cls()
    return cls


def kinds() -> dict[str, Kind]:
    """Every registered kind, after importing all results/kind_*.py modules."""
    for module in pkgutil.iter_modules(results.__path__):
        if module.name.startswith("kind_"):
            importlib.import_module(f"results.{module.name}")
    return dict(_KINDS)


def walk(roots, registry: dict[str, Kind], skip=()) -> dict[str, list[Path]]:
    """Files under `roots` matched by each kind's patterns (hidden folders and `skip`
    folders are not entered), sorted and without duplicates."""
    skip = {Path(s).resolve() for s in skip}
    found: dict[str, set[Path]] = {name: set() for name in registry}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and (Path(folder) / d).resolve() not in skip)
            for filename in files:
                for name, kind in registry.items():
                    if any(fnmatch.fnmatch(filename, p) for p in kind.patterns):
                        found[name].add((Path(folder) / filename).resolve())
    return {name: sorted(paths) for name, paths in found.items() if paths}


def records_with_facts(paths, kind: str):
    """(path, record, run facts) of each JSON record of `kind` among `paths`; a record
    without valid run facts (common/run_facts.py) is left out with one warning."""
    import warnings

    from common.files import read_json
    from common.run_facts import check_facts
    for path in paths:
        record = read_json(path)
        if not isinstance(record, dict) or record.get("kind") != kind:
            continue
        try:
            run = check_facts(record.get("run"), str(path))
        except ValueError as e:
            warnings.warn(f"{e}: skipping this {kind} record")
            continue
        yield path, record, run
