"""ComAlign evaluations: `<run dir>/comalign_eval.json`, written by `python -m
algorithms.comalign.evaluate` ({"kind": "comalign_eval", "model", "checkpoint", "head",
"retrieval": {set: {row: {image_to_text: {R@1, R@5, R@10}, text_to_image: {...}},
num_images, num_captions}}, "compositional": {set: {row: {subset: acc, average},
num_items}}, "run": run facts (common/run_facts.py)}; recalls and accuracies in %).

The backbone (CLIP model) and precision are read from each record's "run" block. Rows
are "<row> · <backbone>[, precision][, identity head]" where <row> is "CLIP" (plain CLIP
on the same embeddings) or "ComAlign (<fusion>)" (the precision joins the label when the
records differ in it); records that differ in backbone or precision are never pooled;
records of the same row (reruns) are averaged (mean ± population std, n = records).
Every table notes the precision(s) and backbone(s) it shows. Tables, one per benchmark:
- comalign_retrieval_<set>: I→T and T→I R@1/5/10;
- comalign_compositional_<set>: accuracy per subset (SugarCrepe's seven, ARO's, the
  generated set's replace_att/obj/rel) and their average.
Malformed records and records without a valid "run" block are skipped with a warning
naming the file. Published rows (results/reference/, protocols comalign_retrieval and
comalign_compositional; dataset = the set's name as the records name it; key "CLIP" or
"ComAlign (<fusion>)") are shown beside each table, with the deltas of the matching rows.
"""
from __future__ import annotations

import re
import warnings

from results import reference
from results.kinds import Kind, records_with_facts, register
from results.tables import Cell, Table, mean_std

KIND = "comalign_eval"
RECALLS = ("R@1", "R@5", "R@10")
NOTE = ("Cells: mean ± population std over records (n = records); CLIP and ComAlign rows "
        "of one record share the same frozen embeddings; — : no number.")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def load_records(paths) -> list:
    out = []
    for path, rec, run in records_with_facts(paths, KIND):
        if not isinstance(rec.get("retrieval", {}), dict) or \
                not isinstance(rec.get("compositional", {}), dict) or \
                not isinstance(run.get("backbone"), str):
            warnings.warn(f"{path}: skipping a comalign_eval record without run backbone/"
                          "retrieval/compositional")
            continue
        out.append(rec)
    return out


def _label(rec, row, with_precision=False):
    run = rec["run"]
    suffix = run["backbone"] + (f", {run['precision']}" if with_precision else "") + \
        (", identity head" if rec.get("head") == "identity" and row != "CLIP" else "")
    return f"{row} · {suffix}"


def _facts_note(records) -> str:
    precisions = sorted({str(r["run"]["precision"]) for r in records})
    backbones = sorted({r["run"]["backbone"] for r in records})
    return (f"Precision: {', '.join(precisions)}; backbone: {', '.join(backbones)} "
            f"(rows never pool records that differ in either).")


def _cell(values):
    m, s = mean_std(values)
    return Cell(m, s if len(values) > 1 else None, n=len(values))


def _rows(records, section, set_name):
    """[(label, entries)]; the label names backbone and (when records differ in it)
    precision, so records that differ in either are never pooled."""
    groups = {}
    with_precision = len({str(r["run"]["precision"]) for r in records}) > 1
    for rec in records:
        entry = rec.get(section, {}).get(set_name)
        if not isinstance(entry, dict):
            continue
        for row, values in entry.items():
            if isinstance(values, dict):
                groups.setdefault(_label(rec, row, with_precision), []).append(values)
    order = lambda label: (0 if label.startswith("CLIP") else 1, label)
    return [(label, groups[label]) for label in sorted(groups, key=order)]


def retrieval_table(records, set_name, refs=()) -> Table:
    columns = [f"I→T {k}" for k in RECALLS] + [f"T→I {k}" for k in RECALLS]
    table = Table(f"comalign_retrieval_{_slug(set_name)}", f"ComAlign retrieval: {set_name}",
                  columns, digits=1, figure_column="T→I R@1", notes=[NOTE])
    for label, entries in _rows(records, "retrieval", set_name):
        cells = []
        for direction in ("image_to_text", "text_to_image"):
            for k in RECALLS:
                vals = [e[direction][k] for e in entries
                        if isinstance(e.get(direction), dict) and k in e[direction]]
                cells.append(_cell(vals))
        table.add(label, cells, key=label.split(" · ")[0])
    arrow = {"image_to_text": "I→T", "text_to_image": "T→I"}
    reference.attach(table, reference.select(refs, protocol="comalign_retrieval",
                                             dataset=set_name),
                     lambda ref: f"{arrow.get(ref.domain)} {ref.metric}")
    return table


def compositional_table(records, set_name, refs=()) -> Table:
    rows = _rows(records, "compositional", set_name)
    subsets = sorted({s for _, entries in rows for e in entries for s in e if s != "average"})
    table = Table(f"comalign_compositional_{_slug(set_name)}",
                  f"ComAlign compositional: {set_name}", [*subsets, "average"], digits=1,
                  figure_column="average",
                  notes=[NOTE, "Accuracy: the true caption scores above the negative "
                               "(image-to-text fused score)."])
    for label, entries in rows:
        table.add(label, [_cell([e[s] for e in entries if s in e]) for s in [*subsets, "average"]],
                  key=label.split(" · ")[0])
    reference.attach(table, reference.select(refs, protocol="comalign_compositional",
                                             dataset=set_name), lambda ref: ref.metric)
    return table


@register
class ComAlignKind(Kind):
    name = "comalign"
    patterns = ("comalign_eval.json",)

    def load(self, paths):
        return load_records(paths)

    def tables(self, records, refs) -> list:
        tables = []
        for section, build in (("retrieval", retrieval_table),
                               ("compositional", compositional_table)):
            sets = []
            for rec in records:
                sets += [s for s in rec.get(section, {}) if s not in sets]
            tables += [build(records, s, refs) for s in sets]
        for t in tables:
            t.notes.append(_facts_note(records))
        return tables
