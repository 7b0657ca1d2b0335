"""Dassl/CoOp tables from fake `<run dir>/results.json` records (the schema
trainers/dassl_adapter.py writes): base/new/HM over seeds, cross-dataset, DG."""
import json

import pytest

from common.run_facts import run_facts
from results import reference
from results.kind_dassl import Dassl, load_runs, protocol_of
from results.tables import to_markdown


def facts(trainer, dataset, subsample, seed, protocol=None, stage=None, precision="fp32",
          backbone="ViT-B/16"):
    """The run facts a Dassl run records (common/run_facts.py); by default a base-to-new
    run for base/new classes, else a plain train_coop.py run."""
    protocol = protocol or ("base2new" if subsample in ("base", "new") else "dassl")
    stage = stage or (subsample if protocol == "base2new" else "test")
    return run_facts(protocol=protocol, stage=stage, method=trainer, config={}, dataset=dataset,
                     precision=precision, backbone=backbone, seeds={"seed": seed})


def write_run(root, trainer, dataset, subsample, seed, accuracy, shots=16, split="test",
              protocol=None, stage=None, precision="fp32", backbone="ViT-B/16", **extra):
    run = root / trainer / dataset / subsample / f"shots_{shots}" / f"seed{seed}"
    if (precision, backbone) != ("fp32", "ViT-B/16"):
        run = run / f"{backbone.replace('/', '')}_{precision}"
    run.mkdir(parents=True)
    (run / "log.txt").write_text("...\n")
    record = {"kind": "dassl", "trainer": trainer, "dataset": dataset,
              "subsample_classes": subsample, "num_shots": shots, "seed": seed, "split": split,
              "num_classes": 10, "metrics": {"accuracy": accuracy, "error_rate": 100 - accuracy,
                                             "macro_f1": accuracy - 1},
              "run": facts(trainer, dataset, subsample, seed, protocol, stage, precision,
                           backbone), **extra}
    (run / "results.json").write_text(json.dumps(record))
    return run


def base2new_runs(root):
    for seed, (base, new) in zip((1, 2, 3), ((90.0, 96.0), (92.0, 97.0), (94.0, 98.0))):
        write_run(root, "CoOp", "OxfordPets", "base", seed, base)
        write_run(root, "CoOp", "OxfordPets", "new", seed, new)
        write_run(root, "CoOp", "Caltech101", "base", seed, 98.0)
        write_run(root, "CoOp", "Caltech101", "new", seed, 90.0)
    return root


def make_tables(root):
    runs = load_runs(sorted(p for p in root.rglob("*") if p.name in ("results.json", "log.txt")))
    return runs, {t.name: t for t in Dassl().tables(runs, reference.load())}


def cell(table, row_label, column):
    return table.cell(next(r for r in table.rows if r.label == row_label), column)


def test_base_new_and_harmonic_mean_by_hand(tmp_path):
    _, tables = make_tables(base2new_runs(tmp_path))
    pets = tables["dassl_base2new_OxfordPets"]
    base, new, hm = (cell(pets, "CoOp", c) for c in ("Base", "New", "HM"))
    # base 90, 92, 94: mean 92, population std sqrt(8/3) = 1.633; new 96, 97, 98
    assert base.text(2) == "92.00 ± 1.63" and new.text(2) == "97.00 ± 0.82" and base.n == 3
    assert hm.mean == pytest.approx(2 * 92 * 97 / (92 + 97))  # 94.4339
    assert hm.text(2) == "94.43"
    # CoCoOp Table 1 row for CoOp on OxfordPets: 93.67 / 95.29 / 94.47
    assert cell(pets, "CoOp (published, ViT-B/16)", "Base").mean == 93.67
    assert cell(pets, "Δ CoOp − CoOp (published)", "Base").text(2, signed=True) == "-1.67"
    assert "| *Δ CoOp − CoOp (published)* | -1.67 | +1.71 | -0.04 |" in to_markdown(pets)


def test_average_over_datasets_and_no_delta_when_incomplete(tmp_path):
    _, tables = make_tables(base2new_runs(tmp_path))
    average = tables["dassl_base2new_average"]
    row = next(r for r in average.rows if r.role == "measured")
    assert row.label == "CoOp (2 datasets)"
    base, new, hm = row.cells
    assert base.mean == pytest.approx((92 + 98) / 2) and new.mean == pytest.approx((97 + 90) / 2)
    assert hm.mean == pytest.approx(2 * 95 * 93.5 / (95 + 93.5))  # HM of the averages
    assert not [r for r in average.rows if r.role == "delta"]  # 2 of 11 datasets: no delta
    assert cell(average, "PromptSRC (published, ViT-B/16)", "HM").mean == 79.97


def test_missing_side_is_missing_not_zero(tmp_path):
    write_run(tmp_path, "MaPLe", "EuroSAT", "base", 1, 95.0)
    _, tables = make_tables(tmp_path)
    table = tables["dassl_base2new_EuroSAT"]
    assert cell(table, "MaPLe", "New").mean is None and cell(table, "MaPLe", "HM").mean is None
    assert "| MaPLe | 95.00 ± 0.00 | — | — |" in to_markdown(table)


def test_the_table_of_a_run_is_read_from_its_run_facts():
    def rec(dataset, sub="all", protocol=None, stage=None):
        return {"dataset": dataset, "subsample_classes": sub,
                "run": facts("CoOp", dataset, sub, 1, protocol, stage)}
    assert protocol_of(rec("OxfordPets", "new")) == "base2new"
    assert protocol_of(rec("ImageNetSketch", protocol="domain_generalization",
                           stage="target")) == "dg"
    assert protocol_of(rec("ImageNet", protocol="cross_dataset", stage="source")) == "source"
    assert protocol_of(rec("ImageNet", protocol="domain_generalization",
                           stage="source")) == "source"
    assert protocol_of(rec("EuroSAT", protocol="cross_dataset", stage="target")) == "xd"
    # no guess from dataset names: a plain run on ImageNetSketch or EuroSAT is its own
    assert protocol_of(rec("ImageNetSketch")) == "fewshot"
    assert protocol_of(rec("EuroSAT")) == "fewshot"
    assert protocol_of(rec("OxfordPets", "base")) == "base2new"


def test_a_record_without_run_facts_is_left_out_and_named(tmp_path):
    write_run(tmp_path, "CoOp", "OxfordPets", "base", 1, 90.0)
    old = write_run(tmp_path, "CoOp", "OxfordPets", "base", 2, 92.0)
    record = json.loads((old / "results.json").read_text())
    del record["run"]
    (old / "results.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=f"seed2/results.json: run: no run facts .*left out"):
        runs, tables = make_tables(tmp_path)
    assert [r.seed for r in runs.runs] == [1] and len(runs.damaged) == 1
    assert any("seed2/results.json (run: no run facts" in n
               for n in tables["dassl_base2new_OxfordPets"].notes)


def test_runs_that_differ_in_precision_or_backbone_are_never_pooled(tmp_path):
    for precision, backbone, acc in (("fp32", "ViT-B/16", 90.0), ("fp16", "ViT-B/16", 80.0),
                                     ("fp32", "RN50", 70.0)):
        write_run(tmp_path, "CoOp", "OxfordPets", "base", 1, acc, precision=precision,
                  backbone=backbone)
        write_run(tmp_path, "CoOp", "OxfordPets", "new", 1, acc, precision=precision,
                  backbone=backbone)
    _, tables = make_tables(tmp_path)
    pets = tables["dassl_base2new_OxfordPets"]
    rows = {r.label: r for r in pets.rows if r.role == "measured"}
    assert set(rows) == {"CoOp (ViT-B/16, fp32)", "CoOp (ViT-B/16, fp16)", "CoOp (RN50, fp32)"}
    assert pets.cell(rows["CoOp (ViT-B/16, fp16)"], "Base").text(2) == "80.00 ± 0.00"
    assert any(r.label == "Δ CoOp (RN50, fp32) − CoOp (published)" for r in pets.rows)
    assert any("never pooled" in n for n in pets.notes)
    _, tables = make_tables(base2new_runs(tmp_path / "one"))
    assert "These runs' backbone: ViT-B/16; precision: fp32." in \
        tables["dassl_base2new_OxfordPets"].notes


def test_cross_dataset_and_domain_generalization_tables(tmp_path):
    xd = {"protocol": "cross_dataset", "stage": "target"}
    for seed in (1, 2):
        write_run(tmp_path, "CoCoOp", "ImageNet", "all", seed, 70.0 + seed,
                  protocol="cross_dataset", stage="source")
        write_run(tmp_path, "CoCoOp", "EuroSAT", "all", seed, 40.0 + seed, shots=-1, **xd)
        write_run(tmp_path, "CoCoOp", "DescribableTextures", "all", seed, 45.0, shots=-1, **xd)
        write_run(tmp_path, "CoCoOp", "ImageNetV2", "all", seed, 64.0, shots=-1,
                  protocol="domain_generalization", stage="target")
    _, tables = make_tables(tmp_path)
    xd, dg = tables["dassl_xd"], tables["dassl_dg"]
    assert xd.columns == ["ImageNet", "DescribableTextures", "EuroSAT", "Average"]
    assert cell(xd, "CoCoOp", "ImageNet").text(2) == "71.50 ± 0.50"
    assert cell(xd, "CoCoOp", "Average").mean == pytest.approx((41.5 + 45.0) / 2)
    assert cell(xd, "CoCoOp (published, ViT-B/16)", "EuroSAT").mean == 45.37
    delta = cell(xd, "Δ CoCoOp − CoCoOp (published)", "EuroSAT")
    assert delta.mean == pytest.approx(41.5 - 45.37)
    assert dg.columns == ["ImageNet", "ImageNetV2", "Average"]
    assert cell(dg, "CLIP (zero-shot) (published, ViT-B/16)", "ImageNetV2").mean == 60.83


def test_bad_records_unfinished_runs_and_other_splits(tmp_path):
    write_run(tmp_path, "CoOp", "OxfordPets", "base", 1, 90.0)
    write_run(tmp_path, "CoOp", "OxfordPets", "base", 2, 91.0, split="val")
    broken = write_run(tmp_path, "CoOp", "OxfordPets", "new", 1, 90.0)
    (broken / "results.json").write_text('{"kind": "dassl", "trainer": ')
    no_metric = write_run(tmp_path, "CoOp", "OxfordPets", "new", 2, 90.0)
    (no_metric / "results.json").write_text(json.dumps({"kind": "dassl", "trainer": "CoOp"}))
    other_kind = tmp_path / "zeroshot_run"
    other_kind.mkdir()
    (other_kind / "results.json").write_text(json.dumps({"kind": "zeroshot"}))
    running = tmp_path / "running" / "seed3"
    running.mkdir(parents=True)
    (running / "log.txt").write_text("epoch 1 ...")
    with pytest.warns(UserWarning) as caught:
        runs, tables = make_tables(tmp_path)
    messages = [str(w.message) for w in caught]
    assert (f"{broken / 'results.json'}:1: truncated or corrupt record (Expecting value): "
            "Dassl run left out as incomplete") in messages
    assert (f"{no_metric / 'results.json'}: a dassl record without dataset, subsample_classes, seed, "
            "metrics: Dassl run left out as incomplete") in messages
    assert len(runs.runs) == 1 and runs.unfinished == 1 and runs.other_splits == 1
    assert len(runs.damaged) == 2
    notes = tables["dassl_base2new_OxfordPets"].notes
    assert any("1 run folder(s) with a log but no results.json" in n for n in notes)
    assert any(n.startswith("2 run(s) left out as incomplete") and "seed1/results.json:1" in n
               for n in notes)


def test_a_damaged_seed_leaves_the_run_out_instead_of_averaging_the_others(tmp_path):
    """Seeds 1-3 at 90/92/94: a corrupt seed-3 record must not turn the cell into the
    mean of seeds 1-2 silently; the run is reported, by file and line."""
    for seed, acc in ((1, 90.0), (2, 92.0), (3, 94.0)):
        run = write_run(tmp_path, "CoOp", "OxfordPets", "base", seed, acc)
        write_run(tmp_path, "CoOp", "OxfordPets", "new", seed, 96.0)
    whole = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps(whole, indent=1)[:-40])  # cut inside line 9+
    with pytest.warns(UserWarning, match=r"seed3/results.json:\d+: truncated or corrupt record"):
        runs, tables = make_tables(tmp_path)
    table = tables["dassl_base2new_OxfordPets"]
    assert cell(table, "CoOp", "Base").n == 2  # seeds 1 and 2 only, and said so:
    assert any("1 run(s) left out as incomplete" in n and "seed3/results.json:" in n
               for n in table.notes)
    for garbage in (b"\xff\xfe{", b"[1, 2]", b'{"kind": "dassl", "trainer": "CoOp", '
                    b'"dataset": "OxfordPets", "subsample_classes": "base", "seed": "x", '
                    b'"metrics": {"accuracy": "high"}}'):
        (run / "results.json").write_bytes(garbage)
        with pytest.warns(UserWarning, match="left out as incomplete"):
            runs, _ = make_tables(tmp_path)
        assert len(runs.runs) == 5 and len(runs.damaged) == 1, garbage
