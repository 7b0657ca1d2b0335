"""Tables: one small data model, the statistics the upstream harnesses use, and writers
for markdown, LaTeX and CSV.

A `Table` has named value columns and `Row`s of `Cell`s; its notes say which backbone and
precision its runs used (`setting_note`: runs that differ in either are never pooled). A row's role is `measured`
(this harness's runs), `published` (a reference row from results/reference/) or `delta`
(measured minus published). A cell with `mean=None` is missing: it is printed as "—",
never as 0.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.files import write_text_atomic

MISSING = "—"


# --- statistics ---------------------------------------------------------------------

def mean_se(values):
    """Mean and standard error as DomainBed's collect_results prints them:
    population std / sqrt(n) (its `format_mean`). (None, None) when empty."""
    values = [float(v) for v in values]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values) / math.sqrt(len(values)))


def mean_std(values):
    """Mean and population std, as CoOp's parse_test_res.py prints them over seeds."""
    values = [float(v) for v in values]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def harmonic_mean(base, new):
    """HM of base and new accuracy (CoCoOp's H); None when either is missing."""
    if base is None or new is None:
        return None
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def setting_note(settings) -> str:
    """The note naming the (backbone, precision) a table shows: a table never pools runs
    that differ in either; with several settings its rows name theirs."""
    settings = sorted(settings)
    if len(settings) == 1:
        backbone, precision = settings[0]
        return f"These runs' backbone: {backbone}; precision: {precision}."
    return ("Rows name their runs' (backbone, precision): " + ", ".join(
        f"({b}, {p})" for b, p in settings) + "; runs that differ in either are never pooled.")


# --- data model ---------------------------------------------------------------------

@dataclass
class Cell:
    mean: float | None = None  # None: missing
    err: float | None = None   # the ± (the table's notes say which statistic)
    n: int = 0                 # how many values (trials, seeds, datasets) it summarises

    def text(self, digits: int, signed: bool = False) -> str:
        if self.mean is None:
            return MISSING
        value = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        return value if self.err is None else f"{value} ± {self.err:.{digits}f}"


@dataclass
class Row:
    label: str
    cells: list[Cell]
    role: str = "measured"  # measured | published | delta
    key: str | None = None  # method name that reference rows match (measured rows)


@dataclass
class Table:
    name: str                 # file stem, unique within one collection
    title: str
    columns: list[str]        # value columns; the row-label column is `row_header`
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    row_header: str = "Method"
    digits: int = 1
    figure_column: str | None = None  # bar chart of this column beside the table

    def cell(self, row: Row, column: str) -> Cell:
        return row.cells[self.columns.index(column)]

    def add(self, label, cells, role="measured", key=None) -> Row:
        row = Row(label, list(cells), role, key)
        self.rows.append(row)
        return row


# --- writers ------------------------------------------------------------------------

def _cell_texts(table, row):
    return [c.text(table.digits, signed=row.role == "delta") for c in row.cells]


def to_markdown(table: Table) -> str:
    lines = [f"### {table.title}", "",
             "| " + " | ".join([table.row_header, *table.columns]) + " |",
             "| --- |" + " ---: |" * len(table.columns)]
    for row in table.rows:
        label = f"*{row.label}*" if row.role != "measured" else row.label
        lines.append("| " + " | ".join([label, *_cell_texts(table, row)]) + " |")
    lines.append("")
    lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "--", "Δ": r"$\Delta$",
                  "−": "-", "√": r"$\surd$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); notes become % comments."""
    lines = [f"% {latex_escape(table.title)}",
             r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule",
             " & ".join(latex_escape(c) for c in [table.row_header, *table.columns]) + r" \\",
             r"\midrule"]
    previous = "measured"
    for row in table.rows:
        if row.role != previous and row.role == "published":
            lines.append(r"\midrule")
        previous = row.role
        label = latex_escape(row.label)
        label = rf"\textit{{{label}}}" if row.role != "measured" else label
        lines.append(" & ".join([label, *map(latex_escape, _cell_texts(table, row))]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {latex_escape(note)}" for note in table.notes]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Tidy CSV: one line per cell (missing cells have an empty mean)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["table", "row", "role", "column", "mean", "err", "n"])
    for row in table.rows:
        for column, cell in zip(table.columns, row.cells):
            writer.writerow([table.name, row.label, row.role, column,
                             "" if cell.mean is None else repr(round(cell.mean, 6)),
                             "" if cell.err is None else repr(round(cell.err, 6)), cell.n])
    return out.getvalue()


def write(table: Table, out_dir) -> list[Path]:
    """Write <name>.md, .tex and .csv atomically; return their paths."""
    out_dir = Path(out_dir)
    return [write_text_atomic(out_dir / f"{table.name}.md", to_markdown(table)),
            write_text_atomic(out_dir / f"{table.name}.tex", to_latex(table)),
            write_text_atomic(out_dir / f"{table.name}.csv", to_csv(table))]
