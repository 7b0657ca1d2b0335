"""`python -m results.collect`: walking, dispatch to kinds, outputs, bad input."""
import json
import sys

import pytest

from results import collect, kinds
from tests.conftest import PY, needs_domainbed, run
from tests.test_results_dassl import base2new_runs
from tests.test_results_domainbed import make_job, random_sweep


def test_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert collect.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no such folder" in err


def test_folder_without_records_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing here")
    assert collect.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no result records under" in err
    assert "results.json" in err and "results.jsonl" in err


def test_dassl_runs_end_to_end(tmp_path, capsys):
    base2new_runs(tmp_path / "runs")
    assert collect.main([str(tmp_path / "runs"), "--out", str(tmp_path / "tables")]) == 0
    out = capsys.readouterr().out
    assert "### Base-to-new: OxfordPets" in out
    assert "| CoOp | 92.00 ± 1.63 | 97.00 ± 0.82 | 94.43 |" in out
    names = {p.name for p in (tmp_path / "tables").iterdir()}
    for stem in ("dassl_base2new_OxfordPets", "dassl_base2new_average"):
        assert {f"{stem}.md", f"{stem}.tex", f"{stem}.csv", f"{stem}.png"} <= names
    # a second run over the same folder does not read its own tables as records
    assert collect.main([str(tmp_path / "runs"), "--out", str(tmp_path / "runs" / "tables")]) == 0
    assert collect.main([str(tmp_path / "runs")]) == 0


def test_entry_point_default_out_dir(tmp_path):
    base2new_runs(tmp_path)
    proc = run([PY, "-m", "results.collect", str(tmp_path), "--no-figures"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tables" / "dassl_base2new_Caltech101.md").exists()
    assert not list((tmp_path / "tables").glob("*.png"))
    assert "wrote 3 tables" in proc.stderr


@needs_domainbed
def test_partial_domainbed_sweep_and_dassl_together(tmp_path, capsys):
    sweep = random_sweep(tmp_path / "sweep", trials=1, hparams=1, steps=1)
    make_job(sweep, "ZSCLIP", [0], 5, 0, [{e: (0.9, 0.9) for e in range(4)}], done=False,
             truncate=True)
    base2new_runs(tmp_path / "coop")
    assert collect.main([str(tmp_path / "sweep"), str(tmp_path / "coop"),
                         "--out", str(tmp_path / "tables")]) == 0
    captured = capsys.readouterr()
    assert "### PACS, model selection: training-domain validation set" in captured.out
    assert "### Base-to-new: OxfordPets" in captured.out
    assert "1 unfinished job(s) (no `done`) left out." in captured.out
    assert (tmp_path / "tables" / "domainbed_iid_PACS.png").exists()


def test_domainbed_missing_upstream_is_reported(tmp_path, capsys, monkeypatch):
    make_job(tmp_path, "ZSCLIP", [0], 0, 0, [{0: (0.5, 0.5), 1: (0.6, 0.6)}])
    monkeypatch.setitem(sys.modules, "domainbed", None)  # `import domainbed` fails
    assert collect.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "DomainBed is not importable" in err and "gave no table" in err


def test_a_new_kind_is_one_registered_class(tmp_path, capsys):
    from results.tables import Cell, Table

    @kinds.register
    class Toy(kinds.Kind):
        name, patterns = "toy", ("toy.json",)

        def load(self, paths):
            return [json.loads(p.read_text()) for p in paths]

        def tables(self, records, refs):
            table = Table("toy", "Toy", ["score"], figure_column="score")
            for r in records:
                table.add(r["method"], [Cell(r["score"])])
            return [table]

    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "toy.json").write_text(json.dumps({"method": "M", "score": 12.5}))
        assert collect.main([str(tmp_path)]) == 0
        assert "| M | 12.5 |" in capsys.readouterr().out
        assert (tmp_path / "tables" / "toy.png").exists()
    finally:
        kinds._KINDS.pop("toy")


def test_kind_needs_name_and_patterns():
    with pytest.raises(ValueError):
        @kinds.register
        class Nameless(kinds.Kind):
            pass
