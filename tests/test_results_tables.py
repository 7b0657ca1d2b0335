"""Table model, statistics, writers and the published reference rows."""
import csv
import io

import pytest

from results import reference
from results.tables import Cell, Table, harmonic_mean, mean_se, mean_std, to_csv, to_latex, \
    to_markdown, write


def test_statistics_by_hand():
    mean, se = mean_se([0.80, 0.85, 0.90])
    assert mean == pytest.approx(0.85) and se == pytest.approx((50 / 3) ** 0.5 / 100 / 3 ** 0.5)
    assert mean_std([90, 92, 94]) == pytest.approx((92.0, (8 / 3) ** 0.5))
    assert harmonic_mean(80.47, 71.69) == pytest.approx(75.83, abs=0.005)  # CoCoOp, average
    assert harmonic_mean(None, 70.0) is None and harmonic_mean(0.0, 0.0) == 0.0
    assert mean_se([]) == (None, None)


def sample_table():
    table = Table("t_one", "PACS: 50% test", ["A", "B_x"], notes=["a note"])
    table.add("ZSCLIP", [Cell(85.0, 2.357, 3), Cell()], key="ZSCLIP")
    table.add("CLIP (published)", [Cell(96.2), Cell()], role="published")
    table.add("Δ ZSCLIP − CLIP", [Cell(-11.2), Cell()], role="delta")
    return table


def test_markdown_latex_csv():
    table = sample_table()
    md = to_markdown(table)
    assert "| ZSCLIP | 85.0 ± 2.4 | — |" in md and "| *Δ ZSCLIP − CLIP* | -11.2 | — |" in md
    assert md.startswith("### PACS: 50% test") and "- a note" in md
    tex = to_latex(table)
    assert r"85.0 $\pm$ 2.4 & --" in tex and r"B\_x" in tex and r"50\% test" in tex
    assert r"\textit{$\Delta$ ZSCLIP - CLIP}" in tex and tex.count(r"\midrule") == 2
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert rows[0] == {"table": "t_one", "row": "ZSCLIP", "role": "measured", "column": "A",
                       "mean": "85.0", "err": "2.357", "n": "3"}
    assert rows[1]["mean"] == "" and rows[1]["err"] == ""


def test_write_is_atomic_and_complete(tmp_path):
    paths = write(sample_table(), tmp_path / "out")
    assert sorted(p.name for p in paths) == ["t_one.csv", "t_one.md", "t_one.tex"]
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_reference_rows_load_and_are_sourced():
    refs = reference.load()
    protocols = {r.protocol for r in refs}
    assert {"domainbed", "base2new", "xd", "dg"} <= protocols
    assert all(r.source and r.check and r.backbone == "ViT-B/16" for r in refs)
    datasets = {"PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet"}
    for key in ("ZSCLIP", "CLIPood"):
        rows = reference.select(refs, protocol="domainbed", key=key)
        assert {r.dataset for r in rows} - {"Average"} == datasets
    b2n = reference.select(refs, protocol="base2new")
    assert {r.key for r in b2n} == {"ZSCLIP", "CoOp;CoOpHarness", "CoCoOp;CoCoOpHarness",
                                    "MaPLe", "PromptSRC"}
    for key in {r.key for r in b2n}:
        for dataset in {r.dataset for r in b2n}:
            v = {r.metric: r.value for r in b2n if r.key == key and r.dataset == dataset}
            assert set(v) == {"base", "new", "hm"}
            assert harmonic_mean(v["base"], v["new"]) == pytest.approx(v["hm"], abs=0.011)
        per = [r for r in b2n if r.key == key and r.dataset != "Average"]
        assert len({r.dataset for r in per}) == 11
        for metric in ("base", "new"):
            mean = sum(r.value for r in per if r.metric == metric) / 11
            published = next(r.value for r in b2n if r.key == key and r.dataset == "Average"
                              and r.metric == metric)
            assert mean == pytest.approx(published, abs=0.011)


def test_attach_adds_published_and_delta_rows():
    table = Table("t", "t", ["Avg"])
    table.add("CLIPood", [Cell(80.0)], key="CLIPood")
    table.add("Other", [Cell(10.0)], key="Other")
    refs = reference.select(reference.load(), protocol="domainbed", dataset="PACS")
    reference.attach(table, refs, lambda ref: ref.domain)
    labels = [r.label for r in table.rows]
    assert labels[:2] == ["CLIPood", "Other"]
    assert {"CLIP (zero-shot) (published, ViT-B/16)", "CLIPood (published, ViT-B/16)"} <= set(labels)
    deltas = {r.label: r.cells[0].mean for r in table.rows if r.label.startswith("Δ")}
    # one delta per published row of the measured method (CLIPood's own, DISAM's re-run); none for "Other"
    assert deltas == {"Δ CLIPood − CLIPood (published)": pytest.approx(80.0 - 97.3),
                      "Δ CLIPood − CLIPood* (as re-run by DISAM) (published)": pytest.approx(80.0 - 96.6)}
