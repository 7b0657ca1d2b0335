"""Published domain + class shift numbers (results/reference/domainbed_open.csv): they
load, they are internally consistent, and they appear marked as published (with the
harness's deltas) in the open-world base/open/HM tables."""
import collections
from types import SimpleNamespace

import pytest

from common.run_facts import run_facts
from results import kind_domainbed, reference
from results.kind_domainbed import Sweep
from results.tables import harmonic_mean, to_markdown
from tests.conftest import needs_domainbed

# DomainBed's ENVIRONMENTS of the two datasets (domainbed/datasets.py)
ENVS = {"OfficeHomeOpen": ["A", "C", "P", "R"],
        "DomainNetOpen": ["clip", "info", "paint", "quick", "real", "sketch"]}
ROUNDING = 0.1  # inputs and results printed to 0.1


def open_refs():
    return reference.select(reference.load(), protocol="domainbed_open")


def values(refs):
    """{(method, metric): {(dataset, domain): value}}"""
    by = collections.defaultdict(dict)
    for r in refs:
        by[r.method, r.metric][r.dataset, r.domain] = r.value
    return by


def test_published_open_world_rows_load_and_are_consistent():
    refs = open_refs()
    assert refs, "results/reference/domainbed_open.csv holds no domain + class shift rows"
    assert {r.metric for r in refs} <= {"base", "open", "hm", "total"}
    assert {r.dataset for r in refs} <= {*ENVS, "Average"}
    for r in refs:
        assert r.domain in ENVS.get(r.dataset, ["Avg"]), r
        assert 0 <= r.value <= 100 and r.backbone and "Table" in r.source and r.check
    for dataset, envs in ENVS.items():  # upstream's names when installed
        assert (kind_domainbed.dataset_environments(dataset.removesuffix("Open")) or envs) == envs
    by = values(refs)
    rows = collections.Counter((r.method, r.metric) for r in refs)
    assert set(rows.values()) == {11}  # 4 OfficeHome + 6 DomainNet domains + Avg per row
    for (method, metric), row in by.items():
        # Avg column: the mean of the OfficeHome and the DomainNet domain means
        means = [sum(row[d, e] for e in envs) / len(envs) for d, envs in ENVS.items()]
        assert row["Average", "Avg"] == pytest.approx(sum(means) / 2, abs=ROUNDING), method
        if metric == "hm":  # an HM the paper prints recomputes from its base and open
            for key, value in row.items():
                base, opened = by[method, "base"][key], by[method, "open"][key]
                assert value == pytest.approx(harmonic_mean(base, opened), abs=ROUNDING)
    for (method, metric), row in by.items():
        if metric == "total":  # every test image: between the base and the open classes'
            for key, total in row.items():
                base, opened = by[method, "base"][key], by[method, "open"][key]
                assert min(base, opened) - ROUNDING <= total <= max(base, opened) + ROUNDING
    assert {r.key for r in refs} >= {"ZSCLIP", "CLIPood"}  # rows the harness gets deltas to
    starred = [r for r in refs if "DISAM's run" in r.method]
    assert starred and all("not the CLIPood paper's number" in r.check for r in starred)


def fake_method():
    return SimpleNamespace(name="training-domain validation set")


def test_published_rows_land_in_the_open_world_columns(monkeypatch):
    """The table as open_world_table builds it, without DomainBed installed."""
    monkeypatch.setattr(kind_domainbed, "dataset_environments",
                        lambda dataset: ENVS["OfficeHomeOpen"] if dataset == "OfficeHomeOpen"
                        else None)
    dataset = "OfficeHomeOpen"
    algorithms = ["CLIPood", "ZSCLIP"]
    base = {(dataset, a): {e: {0: 0.5 + 0.1 * e} for e in range(4)} for a in algorithms}
    opened = {(dataset, a): {e: {0: 0.4 + 0.1 * e} for e in range(4)} for a in algorithms}
    table = kind_domainbed.open_world_table("iid", fake_method(), dataset, algorithms,
                                            base, opened, 4)
    refs = reference.select(open_refs(), dataset=dataset)
    kind_domainbed.attach_open_world(table, refs)
    published = {r.label: r for r in table.rows if r.role == "published"}
    assert len(published) == len({r.method for r in refs})
    by = values(refs)
    for r in refs:
        row = published[f"{r.method} (published, {r.backbone})"]
        column = {"base": f"{r.domain} base", "open": f"{r.domain} open"}.get(r.metric)
        if column:
            assert table.cell(row, column).mean == r.value
        if (r.method, "hm") not in by:  # no HM printed: shown as missing, never computed
            assert all(table.cell(row, f"{env} HM").mean is None for env in ENVS[dataset])
    measured = next(r for r in table.rows if r.label == "CLIPood")
    star = next(m for m in published if m.startswith("CLIPood (DISAM's run) ("))
    delta = next(r for r in table.rows
                 if r.label == "Δ CLIPood − CLIPood (DISAM's run) (published)")
    assert table.cell(delta, "A open").mean == pytest.approx(
        table.cell(measured, "A open").mean - table.cell(published[star], "A open").mean)
    assert any(n.startswith("Published: Zhang et al., Domain-Inspired") for n in table.notes)
    assert any("without DomainBed's model selection" in n for n in table.notes)
    assert f"*{star}*" in to_markdown(table)


def record(algorithm, dataset, test_env, n_envs, acc, open_acc):
    """One checkpoint record as DomainBed's train.py writes it for an `<Name>Open` dataset."""
    r = {"args": {"algorithm": algorithm, "dataset": dataset, "test_envs": [test_env],
                  "hparams_seed": 0, "trial_seed": 0, "holdout_fraction": 0.2,
                  "task": "domain_generalization", "steps": 1},
         "hparams": {"clip_model": "tiny-vit", "precision": "fp32",
                     "run": run_facts(protocol="domainbed_open", stage="train",
                                      method=algorithm, precision="fp32", backbone="tiny-vit",
                                      dataset=dataset, steps=1)},
         "step": 0, "env0_uda_acc": open_acc}
    for e in range(n_envs):
        r[f"env{e}_in_acc"], r[f"env{e}_out_acc"] = acc, acc
    return r


@needs_domainbed
def test_open_world_tables_show_published_rows_marked_as_published():
    records = [record(a, d, t, len(envs), 0.6, 0.5) for d, envs in ENVS.items()
               for a in ("CLIPood", "ZSCLIP") for t in range(len(envs))]
    tables = {t.name: t for t in kind_domainbed.DomainBed().tables(Sweep(records=records),
                                                                    reference.load())}
    for tag in kind_domainbed.OPEN_SELECTIONS:
        for dataset, envs in ENVS.items():
            table = tables[f"domainbed_{tag}_{dataset}_base_open"]
            published = [r for r in table.rows if r.role == "published"]
            assert published and all("(published, " in r.label for r in published)
            zs = next(r for r in published if r.key == "ZSCLIP")
            ref = next(r for r in open_refs() if r.dataset == dataset and r.domain == envs[0]
                       and r.metric == "base" and r.key == "ZSCLIP")
            assert table.cell(zs, f"{envs[0]} base").mean == ref.value
            method = zs.label.split(" (published")[0]
            delta = next(r for r in table.rows if r.label == f"Δ ZSCLIP − {method} (published)")
            assert table.cell(delta, f"{envs[0]} base").mean == pytest.approx(60 - ref.value)
    # the domain-shift tables of the same datasets get none of them
    assert not [r for r in tables["domainbed_iid_OfficeHomeOpen"].rows if r.role == "published"]
