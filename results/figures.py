"""Figures (matplotlib, Agg backend), written atomically as PNG beside the tables."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from common.files import write_atomic  # noqa: E402
from results.tables import Table  # noqa: E402


def save_atomic(fig, path) -> Path:
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                          bbox_inches="tight"))
    finally:
        plt.close(fig)


def bar_chart(table: Table, column: str, path) -> Path | None:
    """Bars of `column` for the measured and published rows (published hatched, ± as
    error bars); None when no row has a number there."""
    rows = [r for r in table.rows
            if r.role != "delta" and table.cell(r, column).mean is not None]
    if not rows:
        return None
    cells = [table.cell(r, column) for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 1.5), 3.6))
    bars = ax.bar(range(len(rows)), [c.mean for c in cells],
                  yerr=[c.err or 0.0 for c in cells], capsize=3,
                  color=["#bbbbbb" if r.role == "published" else "#4c72b0" for r in rows])
    for bar, row in zip(bars, rows):
        if row.role == "published":
            bar.set_hatch("//")
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{column} (%)")
    ax.set_title(table.title, fontsize=9)
    return save_atomic(fig, path)


def bar_charts(tables, out_dir) -> list[Path]:
    """One chart per table that names a `figure_column`: <out_dir>/<table name>.png."""
    made = []
    for table in tables:
        if table.figure_column:
            path = bar_chart(table, table.figure_column, Path(out_dir) / f"{table.name}.png")
            if path:
                made.append(path)
    return made


def alpha_curves(rows: dict, title: str, path) -> Path:
    """WiSE-FT's curve: in-domain and out-of-domain accuracy (%) against alpha, one line
    per row; `rows` is {row label: {alpha: (in-domain, out-of-domain)}}."""
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.4), sharex=True)
    for label, points in sorted(rows.items()):
        alphas = sorted(points)
        for ax, part in zip(axes, (0, 1)):
            ax.plot(alphas, [points[a][part] for a in alphas], marker="o", markersize=3,
                    label=label)
    for ax, name in zip(axes, ("in-domain", "out-of-domain")):
        ax.set_xlabel("alpha (0: zero-shot, 1: fine-tuned)")
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_atomic(fig, path)
