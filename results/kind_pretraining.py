"""Pretraining evaluations: `<run dir>/pretraining_eval.json`, one record per evaluated
checkpoint, written by `python -m pretraining.evaluate` ({"kind": "pretraining_eval",
"model", "method", "checkpoint", "seed", "zeroshot": {set: {top1, top5, ...}},
"retrieval": {set: {image_to_text: {R@1, R@5, R@10}, text_to_image: {...}}},
"linear_probe": {set: {top1, ...}}, "gap": {set: {centroid_distance, alignment_score,
separation_score, uniformity_image, uniformity_text, ...}}}; accuracies and recalls in %).

Method, model (backbone) and precision are read from each record's "run" block
(common/run_facts.py). Rows are runs of one method, backbone and precision
("AlignCLIP-IMSep (tiny-sharedclip)"; the precision joins the label when the records
differ in it): records that differ in precision or backbone are never pooled; several
records of one row (seeds) give mean ± population std over them, n = number of records.
Every table notes the precision(s) and backbone(s) it shows. Tables:
- pretraining_summary: zero-shot top-1 per set, R@1 both ways per retrieval set, centroid
  distance / alignment / separation per gap set (the comparison at a glance);
- pretraining_zeroshot: top-1 and top-5 per set;
- pretraining_retrieval_<set>: I→T and T→I R@1/5/10;
- pretraining_linear_probe: top-1 per test set;
- pretraining_gap_<set>: every gap measure (pretraining/modality_gap.py).
Records of another kind with the same file name are ignored; malformed ones and those
without a valid "run" block are skipped with a warning naming the file.
Published rows (results/reference/, protocols pretraining_zeroshot, pretraining_retrieval,
pretraining_gap; dataset = the set's name as the records name it) are shown beside the
zero-shot, retrieval and gap tables, with the deltas of the rows of the same method.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from results import reference
from results.kinds import Kind, records_with_facts, register
from results.tables import Cell, Table, mean_std

KIND = "pretraining_eval"
METHOD_ORDER = ("CLIP", "SharedCLIP", "AlignCLIP-IMSep")
SECTIONS = ("zeroshot", "retrieval", "linear_probe", "gap")
GAP_COLUMNS = (("centroid_distance", "centroid distance"), ("alignment_score", "alignment"),
               ("separation_score", "separation"), ("mean_unpaired_cosine", "unpaired cos"),
               ("uniformity_image", "uniformity I"), ("uniformity_text", "uniformity T"))
ZEROSHOT_COLUMN = {"top1": "top-1", "top5": "top-5"}  # a published metric's column
ARROW = {"image_to_text": "I→T", "text_to_image": "T→I"}
SPREAD_NOTE = "Cells: mean ± population std over the runs of a row (n = runs); — : no number."


@dataclass
class Record:
    method: str
    model: str  # the run's backbone
    precision: str | None
    path: str
    data: dict

    @property
    def key(self):
        return self.method, self.model, self.precision

    def label(self, with_precision=False):
        extra = f", {self.precision}" if with_precision else ""
        return f"{self.method} ({self.model}{extra})"


def load_records(paths) -> list[Record]:
    out = []
    for path, rec, run in records_with_facts(paths, KIND):
        bad = [f"run {k}" for k in ("method", "backbone") if not isinstance(run.get(k), str)]
        bad += [k for k in SECTIONS if not isinstance(rec.get(k, {}), dict)]
        if bad:
            warnings.warn(f"{path}: skipping a pretraining_eval record without a valid "
                          f"{', '.join(bad)}")
            continue
        out.append(Record(run["method"], run["backbone"], run["precision"], str(path), rec))
    return out


def _rows(records):
    """[(label, runs)]: one row per (method, backbone, precision), never pooled across."""
    groups = {}
    for r in records:
        groups.setdefault(r.key, []).append(r)
    with_precision = len({r.precision for r in records}) > 1
    rank = lambda key: (next((i for i, m in enumerate(METHOD_ORDER) if key[0] == m),
                             len(METHOD_ORDER)), groups[key][0].label(with_precision))
    return [(groups[key][0].label(with_precision), groups[key]) for key in sorted(groups, key=rank)]


def facts_note(records) -> str:
    """Which precision(s) and backbone(s) a table shows."""
    precisions = sorted({str(r.precision) for r in records})
    backbones = sorted({r.model for r in records})
    return (f"Precision: {', '.join(precisions)}; backbone: {', '.join(backbones)} "
            f"(rows never pool runs that differ in either).")


def _sets(records, section):
    names = []
    for r in records:
        order = r.data.get("order", {}).get(section) if isinstance(r.data.get("order"), dict) \
            else None
        present = r.data.get(section, {})
        for name in [n for n in (order or []) if n in present] + list(present):
            if name not in names:
                names.append(name)
    return names


def _cell(runs, getter) -> Cell:
    values = []
    for r in runs:
        try:
            v = getter(r.data)
        except (KeyError, TypeError):
            v = None
        if isinstance(v, (int, float)):
            values.append(float(v))
    mean, std = mean_std(values)
    return Cell(mean, std if len(values) > 1 else None, n=len(values))


def _slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def summary_table(records) -> Table | None:
    columns, getters = [], []
    for s in _sets(records, "zeroshot"):
        columns.append(f"ZS top-1 {s}")
        getters.append(lambda d, s=s: d["zeroshot"][s]["top1"])
    for s in _sets(records, "retrieval"):
        for direction, short in (("image_to_text", "I→T"), ("text_to_image", "T→I")):
            columns.append(f"{short} R@1 {s}")
            getters.append(lambda d, s=s, k=direction: d["retrieval"][s][k]["R@1"])
    gaps = _sets(records, "gap")
    for s in gaps:
        for key, short in GAP_COLUMNS[:3]:
            columns.append(short if len(gaps) == 1 else f"{short} {s}")
            getters.append(lambda d, s=s, k=key: d["gap"][s][k])
    if not columns:
        return None
    table = Table("pretraining_summary", "Pretraining evaluation summary", columns, digits=2,
                  notes=[SPREAD_NOTE, "ZS: zero-shot top-1 (%); R@1 (%); gap measures "
                         "(pretraining/modality_gap.py) on each image's first caption"
                         + (f" of {gaps[0]}" if len(gaps) == 1 else "") + "."])
    for label, runs in _rows(records):
        table.add(label, [_cell(runs, g) for g in getters], key=runs[0].method)
    return table


def zeroshot_table(records, refs=()) -> Table | None:
    sets = _sets(records, "zeroshot")
    if not sets:
        return None
    columns = [f"{s} {k}" for s in sets for k in ("top-1", "top-5")]
    table = Table("pretraining_zeroshot", "Zero-shot classification (%)", columns,
                  figure_column=columns[0], notes=[SPREAD_NOTE])
    templates = sorted({str(r.data.get("templates")) for r in records})
    table.notes.append(f"Templates: {', '.join(templates)}; top-5 — with 5 classes or fewer.")
    for label, runs in _rows(records):
        cells = [_cell(runs, lambda d, s=s, k=k: d["zeroshot"][s][k])
                 for s in sets for k in ("top1", "top5")]
        table.add(label, cells, key=runs[0].method)
    reference.attach(table, reference.select(refs, protocol="pretraining_zeroshot"),
                     lambda ref: f"{ref.dataset} {ZEROSHOT_COLUMN.get(ref.metric)}")
    return table


def retrieval_tables(records, refs=()) -> list[Table]:
    tables = []
    for s in _sets(records, "retrieval"):
        keys = [(d, f"R@{k}") for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
        columns = [f"{'I→T' if d == 'image_to_text' else 'T→I'} {k}" for d, k in keys]
        table = Table(f"pretraining_retrieval_{_slug(s)}", f"Retrieval on {s} (recall, %)",
                      columns, figure_column=columns[0], notes=[SPREAD_NOTE])
        sizes = sorted({(r.data["retrieval"][s].get("n_images"), r.data["retrieval"][s].get(
            "n_captions")) for r in records if s in r.data.get("retrieval", {})}, key=str)
        table.notes.append("Images / captions: " + "; ".join(f"{i} / {c}" for i, c in sizes))
        for label, runs in _rows(records):
            cells = [_cell(runs, lambda d, dd=dd, k=k: d["retrieval"][s][dd][k]) for dd, k in keys]
            table.add(label, cells, key=runs[0].method)
        reference.attach(table, reference.select(refs, protocol="pretraining_retrieval", dataset=s),
                         lambda ref: f"{ARROW.get(ref.domain)} {ref.metric}")
        tables.append(table)
    return tables


def linear_probe_table(records) -> Table | None:
    sets = _sets(records, "linear_probe")
    if not sets:
        return None
    table = Table("pretraining_linear_probe", "Linear probe top-1 (%)", list(sets),
                  figure_column=sets[0], notes=[SPREAD_NOTE, "Logistic regression on frozen "
                  "image features: AdamW, wd 0.01 (0 on bias), lr 0.005 cosine."])
    for label, runs in _rows(records):
        table.add(label, [_cell(runs, lambda d, s=s: d["linear_probe"][s]["top1"]) for s in sets],
                  key=runs[0].method)
    return table


def gap_tables(records, refs=()) -> list[Table]:
    tables = []
    for s in _sets(records, "gap"):
        table = Table(f"pretraining_gap_{_slug(s)}", f"Modality gap on {s}",
                      [c for _, c in GAP_COLUMNS], digits=3,
                      notes=[SPREAD_NOTE, "centroid distance ‖mean I − mean T‖, alignment "
                             "mean cos(I_i, T_i), separation 1 − mean of the cross-modal cosine "
                             "matrix with zeroed diagonal, unpaired cos: its off-diagonal mean, "
                             "uniformity log mean exp(−2‖x−y‖²) (lower: more uniform)."])
        for label, runs in _rows(records):
            table.add(label, [_cell(runs, lambda d, k=k: d["gap"][s][k]) for k, _ in GAP_COLUMNS],
                      key=runs[0].method)
        reference.attach(table, reference.select(refs, protocol="pretraining_gap", dataset=s),
                         lambda ref: dict(GAP_COLUMNS).get(ref.metric))
        tables.append(table)
    return tables


@register
class PretrainingEval(Kind):
    name = "pretraining"
    patterns = ("pretraining_eval.json",)

    def load(self, paths):
        return load_records(paths)

    def tables(self, records, refs) -> list[Table]:
        made = [summary_table(records), zeroshot_table(records, refs),
                *retrieval_tables(records, refs), linear_probe_table(records),
                *gap_tables(records, refs)]
        made = [t for t in made if t is not None]
        for t in made:
            t.notes.append(facts_note(records))
        return made
