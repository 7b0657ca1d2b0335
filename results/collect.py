"""Make result tables from DomainBed sweeps and Dassl/CoOp runs (docs: docs/results.md).

    python -m results.collect <dir> [<dir> ...] [--out DIR]

Walks the folders, hands each record file to its kind (results/kind_*.py: DomainBed
sweeps, Dassl/CoOp runs, ...), adds the published reference rows (results/reference/)
and writes each table as markdown, LaTeX and CSV, plus bar charts, into --out (default:
<first dir>/tables). Prints the markdown. Warnings (skipped records, unfinished jobs,
missing upstream) go to stderr, one line each.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from common import cli
from results import reference, tables as tables_mod
from results.kinds import kinds, walk


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m results.collect",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+",
                        help="folders holding result records (searched recursively)")
    parser.add_argument("--out", help="output folder (default: <first dir>/tables)")
    parser.add_argument("--no-figures", action="store_true", help="write no PNG figures")
    parser.add_argument("--quiet", action="store_true",
                        help="write the tables, print none of them")
    return parser.parse_args(argv)


def collect(roots, out, figures=True):
    """[(kind, tables)] for every kind with records under `roots`; writes into `out`.
    Returns (made, looked_for, found_any_records)."""
    registry = kinds()
    found = walk(roots, registry, skip=[out])
    refs = reference.load()
    made, any_records = [], False
    for name, paths in found.items():
        kind = registry[name]
        records = kind.load(paths)
        if not records:
            continue
        any_records = True
        tables = kind.tables(records, refs)
        for table in tables:
            tables_mod.write(table, out)
        if figures and tables:
            kind.figures(records, tables, out)
        made.append((kind, tables))
    patterns = sorted({p for kind in registry.values() for p in kind.patterns})
    return made, patterns, any_records


def main(argv=None) -> int:
    args = parse_args(argv)
    roots = [Path(d) for d in args.dirs]
    for root in roots:
        if not root.is_dir():
            print(f"results.collect: error: {root}: no such folder", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else roots[0] / "tables"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made, patterns, any_records = collect(roots, out, figures=not args.no_figures)
    for w in caught:
        if not issubclass(w.category, DeprecationWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    where = ", ".join(map(str, roots))
    if not any_records:
        print(f"results.collect: error: no result records under {where} "
              f"(looked for {', '.join(patterns)})", file=sys.stderr)
        return 1
    all_tables = [t for _, tables in made for t in tables]
    if not all_tables:
        print(f"results.collect: error: records under {where} gave no table "
              "(see the warnings above)", file=sys.stderr)
        return 1
    for table in all_tables if not args.quiet else ():
        print(tables_mod.to_markdown(table))
    print(f"wrote {len(all_tables)} tables (.md, .tex, .csv) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
