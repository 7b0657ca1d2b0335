"""Published domain-shift numbers (results/reference/domainbed.csv): they load, each names
its table and how it was checked, DISAM's Table 2 is internally consistent (its printed
average recomputes from its dataset columns), and the rows appear marked as published, with
the harness's deltas, in the DomainBed per-dataset and averages tables."""
import collections
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.run_facts import run_facts
from results import kind_domainbed, reference
from results.kind_domainbed import Sweep
from results.tables import to_markdown
from tests.conftest import needs_domainbed

# DomainBed's ENVIRONMENTS (domainbed/datasets.py), in env index order
ENVS = {"PACS": ["A", "C", "P", "S"], "VLCS": ["C", "L", "S", "V"],
        "OfficeHome": ["A", "C", "P", "R"], "TerraIncognita": ["L100", "L38", "L43", "L46"],
        "DomainNet": ["clip", "info", "paint", "quick", "real", "sketch"]}
DISAM = "arXiv:2405.18861"
ROUNDING = 0.1  # cells printed to 0.1: a mean of them, printed to 0.1, is within 0.1
ALGORITHMS = Path(__file__).resolve().parents[1] / "algorithms"


def domainbed_refs():
    return reference.select(reference.load(), protocol="domainbed")


def disam_refs():
    return [r for r in domainbed_refs() if DISAM in r.source]


def harness_method_names() -> set:
    """`name = "..."` of the harness's method classes (read, not imported: no torch here)."""
    return {m for path in ALGORITHMS.rglob("*.py")
            for m in re.findall(r'^\s*name = "([^"]+)"', path.read_text(), re.M)}


def test_published_domainbed_rows_load_and_name_table_and_check():
    refs = domainbed_refs()
    assert refs, "results/reference/domainbed.csv holds no rows"
    for dataset, envs in ENVS.items():  # upstream's names when installed
        assert (kind_domainbed.dataset_environments(dataset) or envs) == envs
    for r in refs:
        assert "Table" in r.source and r.check.strip() and r.backbone, r
        assert 0 <= r.value <= 100 and (r.err is None or r.err >= 0), r
        assert r.metric == "accuracy" and r.dataset in {*ENVS, "Average"}, r
        assert r.domain in ENVS.get(r.dataset, []) + ["Avg"], r
        assert r.dataset != "Average" or r.domain == "Avg", r
        assert "recalled" not in r.check and "not read from a stored copy" not in r.check, r
    keys = {name for r in refs for name in reference.key_names(r.key)}
    assert keys <= harness_method_names(), keys - harness_method_names()
    # one number per (method, dataset, domain)
    counts = collections.Counter((r.method, r.source, r.dataset, r.domain) for r in refs)
    assert max(counts.values()) == 1


def test_disam_table_2_is_whole_and_its_average_recomputes():
    refs = disam_refs()
    by = collections.defaultdict(dict)  # method -> {dataset: value}
    for r in refs:
        assert r.domain == "Avg" and r.backbone == "ViT-B/16" and "Table 2" in r.source, r
        by[r.method][r.dataset] = r.value
    assert len(by) == 9 and len(refs) == 9 * 6  # 9 printed rows x (5 datasets + Avg.)
    for method, row in by.items():
        assert set(row) == {*ENVS, "Average"}, method
        mean = sum(row[d] for d in ENVS) / len(ENVS)
        assert row["Average"] == pytest.approx(mean, abs=ROUNDING), method
    keys = {r.method: r.key for r in refs}
    assert keys["CLIP (zero-shot)"] == "ZSCLIP" and keys["ERM"] == "CLIPFT"
    assert keys["CoOp"] == "CoOpHarness" and keys["CLIPood"] == "CLIPood"
    rerun = [m for m in by if "(as re-run by DISAM)" in m]
    assert rerun == ["CLIPood* (as re-run by DISAM)"] and keys[rerun[0]] == "CLIPood"
    variants = [m for m in by if m.endswith(("+ SAM", "+ DISAM"))]
    assert len(variants) == 4 and all(keys[m] == "" for m in variants)  # no counterpart


def fake_method():
    return SimpleNamespace(name="training-domain validation set")


def accs_for(dataset, algorithms, base):
    """{(dataset, algorithm): {env: {trial: acc}}}, as selected_accs gives (fractions)."""
    return {(dataset, a): {e: {0: base + 0.01 * e} for e in range(len(ENVS[dataset]))}
            for a in algorithms}


def test_published_rows_land_in_the_per_dataset_table_with_deltas(monkeypatch):
    """A per-dataset table as DomainBed.tables builds it, without DomainBed installed."""
    monkeypatch.setattr(kind_domainbed, "dataset_environments", ENVS.get)
    dataset, algorithms = "PACS", ["CLIPFT", "CLIPood", "CoOpHarness", "ZSCLIP"]
    table = kind_domainbed.dataset_table("iid", fake_method(), dataset, algorithms,
                                         accs_for(dataset, algorithms, 0.9), 4)
    refs = reference.select(domainbed_refs(), dataset=dataset)
    reference.attach(table, refs, lambda ref: ref.domain)
    published = {r.label: r for r in table.rows if r.role == "published"}
    assert len(published) == len({r.method for r in refs})
    for r in refs:
        row = published[f"{r.method} (published, {r.backbone})"]
        assert table.cell(row, "Avg").mean == r.value and row.key == r.key
        assert all(table.cell(row, env).mean is None for env in ENVS[dataset])  # none printed
    measured = {r.label: r for r in table.rows if r.role == "measured"}
    deltas = {r.label: r for r in table.rows if r.role == "delta"}
    for r in refs:
        label = f"Δ {r.key} − {r.method} (published)"
        if not r.key:
            assert not any(d.endswith(f" − {r.method} (published)") for d in deltas)
            continue
        assert table.cell(deltas[label], "Avg").mean == pytest.approx(
            table.cell(measured[r.key], "Avg").mean - r.value)
    # both of DISAM's CLIPood rows (as printed and as DISAM re-ran it) get a delta
    assert sum(d.startswith("Δ CLIPood − ") for d in deltas) == 2
    assert any(n.startswith("Published: Zhang et al., Domain-Inspired") for n in table.notes)
    assert "*CLIP (zero-shot) (published, ViT-B/16)*" in to_markdown(table)


def test_published_per_domain_rows_land_in_their_domain_columns(monkeypatch):
    monkeypatch.setattr(kind_domainbed, "dataset_environments", ENVS.get)
    dataset = "VLCS"
    refs = [r for r in reference.select(domainbed_refs(), dataset=dataset) if r.domain != "Avg"]
    assert refs  # AlignCLIP's rebuttal Table 1 prints the four VLCS domains
    keys = sorted({r.key for r in refs})
    table = kind_domainbed.dataset_table("iid", fake_method(), dataset, keys,
                                         accs_for(dataset, keys, 0.8), 4)
    reference.attach(table, reference.select(domainbed_refs(), dataset=dataset),
                     lambda ref: ref.domain)
    for r in refs:
        row = next(x for x in table.rows
                   if x.label == f"{r.method} (published, {r.backbone})")
        assert table.cell(row, r.domain).mean == r.value
        assert table.cell(row, r.domain).err == r.err
        delta = next(x for x in table.rows if x.label == f"Δ {r.key} − {r.method} (published)")
        measured = next(x for x in table.rows if x.label == r.key)
        assert table.cell(delta, r.domain).mean == pytest.approx(
            table.cell(measured, r.domain).mean - r.value)


def test_published_averages_land_in_the_averages_table():
    datasets = list(ENVS)
    algorithms = ["ZSCLIP", "CLIPood"]
    accs = {(d, a): {e: {0: 0.7} for e in range(len(ENVS[d]))} for d in datasets
            for a in algorithms}
    table = kind_domainbed.averages_table("iid", fake_method(), datasets, algorithms, accs,
                                          {d: len(e) for d, e in ENVS.items()})
    reference.attach(table, [r for r in domainbed_refs() if r.domain == "Avg"],
                     lambda ref: ref.dataset)
    zs = next(r for r in table.rows if r.label == "CLIP (zero-shot) (published, ViT-B/16)")
    for ref in (r for r in disam_refs() if r.key == "ZSCLIP" and r.dataset in ENVS):
        assert table.cell(zs, ref.dataset).mean == ref.value
    # the printed average over the five datasets is no column of this table
    assert table.cell(zs, "Avg").mean is None
    delta = next(r for r in table.rows if r.label == "Δ ZSCLIP − CLIP (zero-shot) (published)")
    pacs = next(r for r in disam_refs() if r.key == "ZSCLIP" and r.dataset == "PACS")
    assert table.cell(delta, "PACS").mean == pytest.approx(70.0 - pacs.value)


def record(algorithm, dataset, test_env, n_envs, acc):
    """One checkpoint record as DomainBed's train.py writes it for a harness algorithm."""
    r = {"args": {"algorithm": algorithm, "dataset": dataset, "test_envs": [test_env],
                  "hparams_seed": 0, "trial_seed": 0, "holdout_fraction": 0.2,
                  "task": "domain_generalization", "steps": 1},
         "hparams": {"clip_model": "tiny-vit", "precision": "fp32",
                     "run": run_facts(protocol="domainbed", stage="train", method=algorithm,
                                      precision="fp32", backbone="tiny-vit", dataset=dataset,
                                      domains=ENVS[dataset], steps=1)},
         "step": 0}
    for e in range(n_envs):
        r[f"env{e}_in_acc"], r[f"env{e}_out_acc"] = acc, acc
    return r


@needs_domainbed
def test_collected_domainbed_tables_show_published_rows_marked_with_deltas():
    datasets = ["PACS", "VLCS"]
    records = [record(a, d, t, len(ENVS[d]), 0.6) for d in datasets
               for a in ("ZSCLIP", "CLIPood", "AlignCLIP") for t in range(len(ENVS[d]))]
    tables = {t.name: t for t in kind_domainbed.DomainBed().tables(Sweep(records=records),
                                                                    reference.load())}
    refs = domainbed_refs()
    for tag in ("iid", "oracle"):
        for dataset in datasets:
            table = tables[f"domainbed_{tag}_{dataset}"]
            published = [r for r in table.rows if r.role == "published"]
            assert published and all("(published, " in r.label for r in published)
            zs = next(r for r in published if r.key == "ZSCLIP")
            ref = next(r for r in refs if r.dataset == dataset and r.domain == "Avg"
                       and r.key == "ZSCLIP")
            assert table.cell(zs, "Avg").mean == ref.value
            delta = next(r for r in table.rows
                         if r.label == "Δ ZSCLIP − CLIP (zero-shot) (published)")
            assert table.cell(delta, "Avg").mean == pytest.approx(60.0 - ref.value)
            assert f"*{zs.label}*" in to_markdown(table)
        averages = tables[f"domainbed_{tag}_averages"]
        row = next(r for r in averages.rows
                   if r.label == "CLIPood (published, ViT-B/16)" and r.role == "published")
        ref = next(r for r in refs if r.method == "CLIPood" and r.dataset == "VLCS")
        assert averages.cell(row, "VLCS").mean == ref.value
    vlcs = tables["domainbed_iid_VLCS"]
    align = next(r for r in vlcs.rows if r.label == "AlignCLIP (published, ViT-B/16)")
    for ref in (r for r in refs if r.method == "AlignCLIP" and r.dataset == "VLCS"):
        assert vlcs.cell(align, ref.domain).mean == ref.value
