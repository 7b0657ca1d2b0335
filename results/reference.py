"""Published reference numbers (results/reference/*.csv) and the rows they add to tables.

Every CSV has the columns of `Ref`:
- protocol: `domainbed`, `domainbed_open` (domain + class shift, the harness's `<Name>Open`
  datasets), `base2new`, `xd` (cross-dataset) or `dg` (ImageNet variants);
- dataset: DomainBed's dataset name (`OfficeHomeOpen`, ... for `domainbed_open`), or CoOp's
  `DATASET.NAME` (`OxfordFlowers`, `DescribableTextures`, ...); `Average` for a published
  average over datasets;
- domain: DomainBed's environment name (`C`, `L`, ... as in its ENVIRONMENTS) or `Avg`
  (average over test domains); `source` for the ImageNet column of xd/dg; else empty;
- metric: `accuracy`, or `base` / `new` / `hm` for base-to-new, `base` / `open` / `hm` /
  `total` (every test-domain image) for domain + class shift;
- method: the published name; key: the harness's method name it corresponds to (a row
  of that name gets a delta against it); backbone: the paper's backbone;
- value, err: in %, err empty when not published;
- source: paper and table; check: how the number was checked.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from results.tables import Cell, Table

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


@dataclass(frozen=True)
class Ref:
    protocol: str
    dataset: str
    domain: str
    metric: str
    method: str
    key: str
    backbone: str
    value: float
    err: float | None
    source: str
    check: str


def load(directory=REFERENCE_DIR) -> list[Ref]:
    refs = []
    for path in sorted(Path(directory).glob("*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                row["value"] = float(row["value"])
                row["err"] = float(row["err"]) if row.get("err") else None
                refs.append(Ref(**{k: row[k] for k in Ref.__dataclass_fields__}))
    return refs


def select(refs, **fields) -> list[Ref]:
    return [r for r in refs if all(getattr(r, k) == v for k, v in fields.items())]


def attach(table: Table, refs, column_of) -> None:
    """Append a '<method> (published, <backbone>)' row per published method whose numbers
    land in the table's columns (`column_of(ref)` names the column, or None), then a
    'Δ <row> − <method>' row for every measured row whose key is that method's key (when
    they share a number)."""
    by_method: dict[tuple, dict[str, Ref]] = {}
    for ref in refs:
        column = column_of(ref)
        if column in table.columns:
            by_method.setdefault((ref.method, ref.key, ref.backbone), {})[column] = ref
    measured = [r for r in table.rows if r.role == "measured"]
    for (method, key, backbone), cols in by_method.items():
        cells = [Cell(cols[c].value, cols[c].err) if c in cols else Cell() for c in table.columns]
        table.add(f"{method} (published, {backbone})", cells, role="published", key=key)
        for row in (r for r in measured if r.key == key):
            deltas = [Cell(m.mean - p.mean) if m.mean is not None and p.mean is not None
                      else Cell() for m, p in zip(row.cells, cells)]
            if any(d.mean is not None for d in deltas):
                table.add(f"Δ {row.label} − {method} (published)", deltas, role="delta")
    sources = sorted({ref.source for cols in by_method.values() for ref in cols.values()})
    table.notes += [f"Published: {source}." for source in sources]
