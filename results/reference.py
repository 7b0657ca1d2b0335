"""Published reference numbers (results/reference/*.csv) and the rows they add to tables.

Every CSV has the columns of `Ref`:
- protocol: `domainbed`, `domainbed_open` (domain + class shift, the harness's `<Name>Open`
  datasets), `base2new`, `xd` (cross-dataset) or `dg` (ImageNet variants); the seeds'
  evaluations: `calip_zeroshot` (Dassl, all classes of a CoOp dataset),
  `pretraining_zeroshot`, `pretraining_retrieval`, `pretraining_gap`
  (results/kind_pretraining.py), `comalign_retrieval`, `comalign_compositional`
  (results/kind_comalign.py);
- dataset: DomainBed's dataset name (`OfficeHomeOpen`, ... for `domainbed_open`), or CoOp's
  `DATASET.NAME` (`OxfordFlowers`, `DescribableTextures`, ...); `Average` for a published
  average over datasets; for the pretraining and ComAlign protocols the evaluation set's
  name as the harness's records name it;
- domain: DomainBed's environment name (`C`, `L`, ... as in its ENVIRONMENTS) or `Avg`
  (average over test domains); `source` for the ImageNet column of xd/dg; for the
  retrieval protocols the direction, `image_to_text` or `text_to_image`; else empty;
- metric: `accuracy`, or `base` / `new` / `hm` for base-to-new, `base` / `open` / `hm` /
  `total` (every test-domain image) for domain + class shift; `top1` / `top5`
  (pretraining_zeroshot), `R@1` / `R@5` / `R@10` (retrieval), a gap measure's key
  (pretraining_gap: `centroid_distance`, ...), a subset's name or `average`
  (comalign_compositional);
- method: the published name; key: the names of the harness's methods or trainers it
  corresponds to, separated by `;` (a measured row of any of them gets a delta against it:
  `CoOp;CoOpHarness` serves CoOp's own trainer and the harness's CoOp), empty when none;
  backbone: the paper's backbone;
- value, err: in % (gap measures: as the paper prints them), err empty when not published;
- source: paper and table; check: how the number was checked.
`load` refuses (one line naming the file and line) a row of an unknown protocol, of a
metric its protocol does not have, with a value that is not a finite number, without
dataset, metric, method, backbone, source or check (`key` may be empty: no harness
counterpart), or whose key has an empty or blank-padded name, or one name twice. It does
not know which names exist: tests/test_reference_domainbed.py and
tests/test_reference_coop.py check them against the harness's and upstream's names.
"""
from __future__ import annotations

import csv
import math
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


RETRIEVAL = {"R@1", "R@5", "R@10"}
# protocol -> its metrics (None: any name, e.g. a benchmark's subsets)
METRICS = {
    "domainbed": {"accuracy"}, "domainbed_open": {"base", "open", "hm", "total"},
    "base2new": {"base", "new", "hm"}, "xd": {"accuracy"}, "dg": {"accuracy"},
    "calip_zeroshot": {"accuracy"},
    "pretraining_zeroshot": {"top1", "top5"},
    "pretraining_retrieval": RETRIEVAL,
    "pretraining_gap": None,
    "comalign_retrieval": RETRIEVAL,
    "comalign_compositional": None,
}
DIRECTIONS = ("image_to_text", "text_to_image")  # the retrieval protocols' `domain`
KEY_SEPARATOR = ";"  # between the names of one key
REQUIRED_TEXT = ("dataset", "metric", "method", "backbone", "source", "check")  # key may be
# empty: a published method the harness has no counterpart of (no delta)


def _number(text, name, where):
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {name} {text!r} is not finite")
    return value


def key_names(key: str) -> tuple[str, ...]:
    """The names a `key` holds: '' -> (), 'CoOp;CoOpHarness' -> ('CoOp', 'CoOpHarness')."""
    return tuple(key.split(KEY_SEPARATOR)) if key else ()


def parse_row(row: dict, where: str) -> Ref:
    """One CSV row as a Ref, or ValueError (one line) saying what is wrong with it."""
    missing = [k for k in Ref.__dataclass_fields__ if k not in row]
    if missing:
        raise ValueError(f"{where}: no column {', '.join(missing)}")
    protocol = row["protocol"]
    if protocol not in METRICS:
        raise ValueError(f"{where}: unknown protocol {protocol!r} "
                         f"(known: {', '.join(sorted(METRICS))})")
    empty = [k for k in REQUIRED_TEXT if not (row[k] or "").strip()]
    if empty:
        raise ValueError(f"{where}: empty {', '.join(empty)}")
    metrics = METRICS[protocol]
    if metrics is not None and row["metric"] not in metrics:
        raise ValueError(f"{where}: metric {row['metric']!r} is not one of {protocol}'s "
                         f"({', '.join(sorted(metrics))})")
    if protocol.endswith("_retrieval") and row["domain"] not in DIRECTIONS:
        raise ValueError(f"{where}: a retrieval row's domain is {' or '.join(DIRECTIONS)}, "
                         f"not {row['domain']!r}")
    names = key_names(row["key"] or "")
    if any(not n or n != n.strip() for n in names) or len(set(names)) < len(names):
        raise ValueError(f"{where}: key {row['key']!r} is not names separated by "
                         f"{KEY_SEPARATOR!r} (no empty, blank-padded or repeated name)")
    fields = {k: row[k] for k in Ref.__dataclass_fields__}
    fields["value"] = _number(row["value"], "value", where)
    fields["err"] = _number(row["err"], "err", where) if row.get("err") else None
    return Ref(**fields)


def load(directory=REFERENCE_DIR) -> list[Ref]:
    """Every row of every `*.csv` in `directory`, checked (`parse_row`)."""
    refs = []
    for path in sorted(Path(directory).glob("*.csv")):
        with open(path, newline="") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                refs.append(parse_row(row, f"{path.name}:{line}"))
    return refs


def select(refs, **fields) -> list[Ref]:
    return [r for r in refs if all(getattr(r, k) == v for k, v in fields.items())]


def attach(table: Table, refs, column_of) -> None:
    """Append a '<method> (published, <backbone>)' row per published method whose numbers
    land in the table's columns (`column_of(ref)` names the column, or None), then a
    'Δ <row> − <method>' row for every measured row whose key is one of the names of that
    method's key (`key_names`; when they share a number)."""
    by_method: dict[tuple, dict[str, Ref]] = {}
    for ref in refs:
        column = column_of(ref)
        if column in table.columns:
            by_method.setdefault((ref.method, ref.key, ref.backbone), {})[column] = ref
    measured = [r for r in table.rows if r.role == "measured"]
    for (method, key, backbone), cols in by_method.items():
        cells = [Cell(cols[c].value, cols[c].err) if c in cols else Cell() for c in table.columns]
        table.add(f"{method} (published, {backbone})", cells, role="published", key=key)
        for row in (r for r in measured if r.key in key_names(key)):
            deltas = [Cell(m.mean - p.mean) if m.mean is not None and p.mean is not None
                      else Cell() for m, p in zip(row.cells, cells)]
            if any(d.mean is not None for d in deltas):
                table.add(f"Δ {row.label} − {method} (published)", deltas, role="delta")
    sources = sorted({ref.source for cols in by_method.values() for ref in cols.values()})
    table.notes += [f"Published: {source}." for source in sources]
