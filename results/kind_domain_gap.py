"""Domain-gap records (`domain_gap.json`, written by `python -m results.domain_gap`): per
algorithm and test domain, the proxy A-distance between training-domain and test-domain
features before (zero-shot CLIP) and after training, beside the job's accuracies."""
from __future__ import annotations

import collections

import numpy as np

from common.files import read_json
from results.kinds import Kind, register
from results.tables import Cell, Table

COLUMNS = ("A-distance, zero-shot", "A-distance, trained", "in-domain acc", "test acc")


@register
class DomainGap(Kind):
    name = "domain_gap"
    patterns = ("domain_gap.json",)

    def load(self, paths):
        return [r for r in map(read_json, paths) if r and r.get("kind") == "domain_gap"]

    def tables(self, records, refs):
        tables = []
        for dataset in sorted({r["dataset"] for r in records}):
            rows = collections.defaultdict(list)
            for r in records:
                if r["dataset"] == dataset:
                    rows[r["algorithm"], r["test_env"]].append(r)
            table = Table(f"domain_gap_{dataset}", f"{dataset}: domain gap (proxy A-distance, "
                          "training vs test domain features) beside accuracy",
                          list(COLUMNS), row_header="Algorithm, test env", digits=2)
            for (algorithm, env), group in sorted(rows.items()):
                values = [[r["a_distance_zero_shot"] for r in group],
                          [r["a_distance"] for r in group],
                          [100 * r["in_domain_acc"] for r in group],
                          [100 * r["test_acc"] for r in group if r.get("test_acc") is not None]]
                table.add(f"{algorithm}, env{env}",
                          [Cell(float(np.mean(v)) if v else None, n=len(v)) for v in values])
            table.notes.append("A-distance 2(1 - 2 err) of tllib's linear domain classifier "
                               "(0: the domains' features are indistinguishable); accuracies "
                               "in % at the job's last checkpoint, mean over its trials and "
                               "hyperparameter draws.")
            tables.append(table)
        return tables
