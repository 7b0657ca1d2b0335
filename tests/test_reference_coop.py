"""Published CoOp-family numbers (results/reference/base2new.csv, xd.csv, dg.csv): every row
names its table and where it was read, the printed harmonic means and averages recompute,
the papers' shared rows agree across files, and one published row serves several harness
names (`key` = names separated by ';'): CoOp's own trainer and the harness's CoOpHarness
both get a delta against the one published CoOp row."""
import collections
import csv

import pytest

from results import reference
from results.tables import Cell, Table, harmonic_mean, to_markdown
from sweeps.coop_protocols import OPENAI_CLIP_TRAINERS
from tests.test_reference_domainbed import harness_method_names
from tests.test_results_dassl import make_tables, write_run

ROUNDING = 0.005 + 1e-9  # printed to 0.01: a value recomputed from printed ones is within 0.005
STORED = "github.com/hiennguyen9874/llm-wiki"  # the papers' arXiv LaTeX sources
PAPERS = {"arXiv:2203.05557": "raw/2203.05557_CoCoOp/", "arXiv:2210.03117": "raw/2210.03117_MaPLe/",
          "arXiv:2307.06948": "raw/2307.06948_PromptSRC/"}
DATASETS = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101",
            "FGVCAircraft", "SUN397", "DescribableTextures", "EuroSAT", "UCF101"]
B2N_COLUMNS = {"base": "Base", "new": "New", "hm": "HM"}


def refs_of(protocol):
    return reference.select(reference.load(), protocol=protocol)


def by_method(refs):
    """{method: {(dataset, metric): value}}"""
    by = collections.defaultdict(dict)
    for r in refs:
        by[r.method][r.dataset, r.metric] = r.value
    return by


@pytest.mark.parametrize("protocol", ["base2new", "xd", "dg"])
def test_rows_name_their_table_and_where_they_were_read(protocol):
    refs = refs_of(protocol)
    assert refs
    for r in refs:
        (paper,) = [p for p in PAPERS if p in r.source]
        assert "Table " in r.source and r.backbone == "ViT-B/16", r
        assert "read from a stored copy" in r.check and STORED in r.check, r
        assert PAPERS[paper] in r.check, r  # read in that paper's own source
        assert "recalled" not in r.check and "not read" not in r.check, r
    # one number per (method, dataset, metric)
    counts = collections.Counter((r.method, r.dataset, r.domain, r.metric) for r in refs)
    assert max(counts.values()) == 1


def test_base2new_is_whole_and_every_hm_and_average_recomputes():
    by = by_method(refs_of("base2new"))
    assert set(by) == {"CLIP (zero-shot)", "CoOp", "CoCoOp", "MaPLe", "PromptSRC"}
    for method, v in by.items():
        assert set(v) == {(d, m) for d in [*DATASETS, "Average"] for m in B2N_COLUMNS}, method
        for dataset in [*DATASETS, "Average"]:  # H = 2 base new / (base + new), as printed
            hm = harmonic_mean(v[dataset, "base"], v[dataset, "new"])
            assert v[dataset, "hm"] == pytest.approx(hm, abs=ROUNDING), (method, dataset)
        for metric in ("base", "new"):  # the printed average is the mean of the 11 datasets
            mean = sum(v[d, metric] for d in DATASETS) / len(DATASETS)
            assert v["Average", metric] == pytest.approx(mean, abs=ROUNDING), (method, metric)


def test_xd_is_whole_its_average_recomputes_and_its_source_column_is_dg_s():
    xd, dg = by_method(refs_of("xd")), by_method(refs_of("dg"))
    assert set(xd) == {"CoOp", "CoCoOp", "MaPLe", "PromptSRC"}
    targets = DATASETS[1:]
    for method, v in xd.items():
        assert set(v) == {(d, "accuracy") for d in [*DATASETS, "Average"]}, method
        mean = sum(v[d, "accuracy"] for d in targets) / len(targets)  # ImageNet is the source
        assert v["Average", "accuracy"] == pytest.approx(mean, abs=ROUNDING), method
        # the same ImageNet-trained prompts: the papers print one source number for both
        assert v["ImageNet", "accuracy"] == dg[method]["ImageNet", "accuracy"], method
    sources = {r.method: r for r in refs_of("xd") if r.dataset == "ImageNet"}
    assert all(r.domain == "source" for r in sources.values())


@pytest.mark.parametrize("protocol", ["base2new", "xd", "dg"])
def test_every_key_names_a_harness_method_or_an_upstream_trainer(protocol):
    known = harness_method_names() | set(OPENAI_CLIP_TRAINERS)
    for r in refs_of(protocol):
        names = reference.key_names(r.key)
        assert names and set(names) <= known, (r.method, r.key, set(names) - known)
    keys = {r.method: r.key for r in refs_of(protocol)}
    assert keys["CoOp"] == "CoOp;CoOpHarness" and keys["CoCoOp"] == "CoCoOp;CoCoOpHarness"
    assert keys.get("MaPLe", "MaPLe") == "MaPLe"


def test_key_names_split_on_semicolons():
    assert reference.key_names("CoOp;CoOpHarness") == ("CoOp", "CoOpHarness")
    assert reference.key_names("ZSCLIP") == ("ZSCLIP",)
    assert reference.key_names("") == ()


def test_one_published_row_gives_a_delta_to_each_of_its_names():
    """The attach of results/kind_dassl.py on a hand-made base-to-new table."""
    table = Table("t", "Base-to-new: OxfordPets", ["Base", "New", "HM"])
    table.add("CoOp", [Cell(90.0), Cell(96.0), Cell(harmonic_mean(90.0, 96.0))], key="CoOp")
    table.add("CoOpHarness", [Cell(92.0), Cell(94.0), Cell()], key="CoOpHarness")
    table.add("KgCoOp", [Cell(91.0), Cell(95.0), Cell()], key="KgCoOp")
    refs = reference.select(refs_of("base2new"), dataset="OxfordPets")
    reference.attach(table, refs, lambda ref: B2N_COLUMNS.get(ref.metric))
    coop = [r for r in table.rows if r.label == "CoOp (published, ViT-B/16)"]
    assert len(coop) == 1 and coop[0].key == "CoOp;CoOpHarness"  # one published row
    published = {r.metric: r.value for r in refs if r.method == "CoOp"}
    deltas = {r.label: r for r in table.rows if r.role == "delta"}
    for measured, base in (("CoOp", 90.0), ("CoOpHarness", 92.0)):
        row = deltas[f"Δ {measured} − CoOp (published)"]
        assert table.cell(row, "Base").mean == pytest.approx(base - published["base"])
    assert table.cell(deltas["Δ CoOpHarness − CoOp (published)"], "HM").mean is None
    # no published KgCoOp row, and no name matches another method's row
    assert not [label for label in deltas if label.startswith("Δ KgCoOp")]
    assert not [label for label in deltas if "CoOpHarness − CoCoOp" in label]


def test_cross_dataset_rows_serve_both_cocoop_names():
    table = Table("t", "Cross-dataset", ["ImageNet", "EuroSAT", "Average"])
    table.add("CoCoOp", [Cell(71.0), Cell(45.0), Cell()], key="CoCoOp")
    table.add("CoCoOpHarness", [Cell(70.0), Cell(44.0), Cell()], key="CoCoOpHarness")
    refs = refs_of("xd")
    reference.attach(table, refs, lambda ref: ref.dataset)
    eurosat = next(r.value for r in refs if r.method == "CoCoOp" and r.dataset == "EuroSAT")
    for measured, value in (("CoCoOp", 45.0), ("CoCoOpHarness", 44.0)):
        row = next(r for r in table.rows if r.label == f"Δ {measured} − CoCoOp (published)")
        assert table.cell(row, "EuroSAT").mean == pytest.approx(value - eurosat)


def test_collected_base2new_table_gives_coop_and_coopharness_their_deltas(tmp_path):
    """Through the Dassl tables (results/kind_dassl.py) built from generated run records."""
    for trainer, base, new in (("CoOp", 90.0, 96.0), ("CoOpHarness", 92.0, 94.0)):
        write_run(tmp_path, trainer, "OxfordPets", "base", 1, base)
        write_run(tmp_path, trainer, "OxfordPets", "new", 1, new)
    _, tables = make_tables(tmp_path)
    pets = tables["dassl_base2new_OxfordPets"]
    published = {r.metric: r.value for r in refs_of("base2new")
                 if r.method == "CoOp" and r.dataset == "OxfordPets"}
    markdown = to_markdown(pets)
    assert markdown.count("*CoOp (published, ViT-B/16)*") == 1
    for trainer, new in (("CoOp", 96.0), ("CoOpHarness", 94.0)):
        row = next(r for r in pets.rows if r.label == f"Δ {trainer} − CoOp (published)")
        assert pets.cell(row, "New").mean == pytest.approx(new - published["new"])


GOOD = ["base2new", "OxfordPets", "", "base", "CoOp", "CoOp;CoOpHarness", "ViT-B/16", "93.67",
        "", "A generated paper, Table 1", "generated by the test"]


@pytest.mark.parametrize("key", ["CoOp;", ";CoOp", "CoOp;;CoOpHarness", "CoOp; CoOpHarness",
                                 "CoOp;CoOp"])
def test_the_loader_refuses_a_malformed_key_in_one_line_naming_file_and_line(tmp_path, key):
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(reference.Ref.__dataclass_fields__)
        writer.writerow(GOOD)
        writer.writerow([*GOOD[:5], key, *GOOD[6:]])
    with pytest.raises(ValueError, match="bad.csv:3") as info:
        reference.load(tmp_path)
    assert f"key {key!r}" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "bad.csv").unlink()
    with open(tmp_path / "good.csv", "w", newline="") as f:
        csv.writer(f).writerows([reference.Ref.__dataclass_fields__, GOOD])
    (ref,) = reference.load(tmp_path)
    assert reference.key_names(ref.key) == ("CoOp", "CoOpHarness")
