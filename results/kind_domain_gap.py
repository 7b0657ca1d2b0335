"""Domain-gap records (`domain_gap.json`, written by `python -m evaluation.domain_gap`): per
algorithm and test domain, the proxy A-distance between training-domain and test-domain
features before (zero-shot CLIP) and after training, beside the job's accuracies.

A record without valid run facts ("run", common/run_facts.py: written before they were
recorded) is left out with a warning naming the file. Rows never pool records that differ
in backbone or precision (of the analysis, from the run facts): with one setting each
table names it in a note, with several each row does."""
from __future__ import annotations

import collections
import warnings

import numpy as np

from common.records import read_json
from common.run_facts import check_facts
from results.kinds import Kind, register
from results.tables import Cell, Table, setting_note

COLUMNS = ("A-distance, zero-shot", "A-distance, trained", "in-domain acc", "test acc")


def record_problem(record) -> str | None:
    """Why a domain_gap.json cannot be tabulated (None: it can; not ours: "")."""
    if not isinstance(record, dict) or record.get("kind") != "domain_gap":
        return ""
    try:
        facts = check_facts(record.get("run"), "run")
    except ValueError as e:
        return f"{e} (a record written before they were recorded?)"
    return None if facts["backbone"] and facts["precision"] else \
        "run facts without backbone or precision"


def setting_of(record) -> tuple[str, str]:
    return str(record["run"]["backbone"]), str(record["run"]["precision"])


@register
class DomainGap(Kind):
    name = "domain_gap"
    patterns = ("domain_gap.json",)

    def load(self, paths):
        records = []
        for path in paths:
            record, damage = read_json(path)
            problem = str(damage) if damage else record_problem(record)
            if problem is None:
                records.append(record)
            elif problem:  # "": another kind's file of that name
                where = "" if damage else f"{path}: "
                warnings.warn(f"{where}{problem}: domain-gap record left out")
        return records

    def tables(self, records, refs):
        tables = []
        several = len({setting_of(r) for r in records}) > 1
        for dataset in sorted({r["dataset"] for r in records}):
            mine = [r for r in records if r["dataset"] == dataset]
            rows = collections.defaultdict(list)
            for r in mine:
                rows[(r["algorithm"], r["test_env"], *(setting_of(r) if several else ()))].append(r)
            table = Table(f"domain_gap_{dataset}", f"{dataset}: domain gap (proxy A-distance, "
                          "training vs test domain features) beside accuracy",
                          list(COLUMNS), row_header="Algorithm, test env", digits=2)
            for (algorithm, env, *setting), group in sorted(rows.items()):
                values = [[r["a_distance_zero_shot"] for r in group],
                          [r["a_distance"] for r in group],
                          [100 * r["in_domain_acc"] for r in group],
                          [100 * r["test_acc"] for r in group if r.get("test_acc") is not None]]
                label = f"{algorithm}, env{env}" + (" ({}, {})".format(*setting) if setting else "")
                table.add(label, [Cell(float(np.mean(v)) if v else None, n=len(v))
                                  for v in values])
            table.notes.append("A-distance 2(1 - 2 err) of tllib's linear domain classifier "
                               "(0: the domains' features are indistinguishable); accuracies "
                               "in % at the job's last checkpoint, mean over its trials and "
                               "hyperparameter draws.")
            table.notes.append(setting_note({setting_of(r) for r in mine}))
            tables.append(table)
        return tables
