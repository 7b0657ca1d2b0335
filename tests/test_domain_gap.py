"""evaluation/domain_gap.py: tllib's A-distance and t-SNE over finished DomainBed jobs, on
the device and precision asked for; results/kind_domain_gap.py: their table."""
import json

import pytest

from common.run_facts import check_facts, file_digest, run_facts
from results.kind_domain_gap import DomainGap
from tests.conftest import PY, TINY, needs_domainbed, run, upstream_missing

needs_tllib = pytest.mark.skipif(
    bool(upstream_missing("Transfer-Learning-Library", "tllib")),
    reason=upstream_missing("Transfer-Learning-Library", "tllib") or "")
pytestmark = [needs_domainbed, needs_tllib]


def test_a_distance_and_tsne_of_a_zero_shot_and_a_fine_tuned_job(small_world, tmp_path):
    sweep = tmp_path / "sweep"
    for algorithm, steps in (("ZSCLIP", 1), ("CLIPFT", 3)):
        hparams = {**TINY, "batch_size": 8, "lr": 1e-4}
        result = run([PY, "-m", "domainbed.scripts.train", "--algorithm", algorithm,
                      "--dataset", "CLIPWorld", "--data_dir", small_world["domainbed_root"],
                      "--test_envs", "1", "--steps", str(steps), "--output_dir",
                      str(sweep / algorithm), "--hparams", json.dumps(hparams)], cwd=tmp_path)
        assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    (sweep / "unfinished").mkdir()  # no done, no model.pkl: left alone
    result = run([PY, "-m", "evaluation.domain_gap", str(sweep), "--images-per-domain", "12",
                  "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 job(s) analysed on cpu at fp32" in result.stderr
    assert not (sweep / "tables").exists()  # the collector makes the table, not the analysis
    records = {name: json.loads((sweep / name / "domain_gap.json").read_text())
               for name in ("ZSCLIP", "CLIPFT")}
    for name, record in records.items():
        assert 0 <= record["a_distance_zero_shot"] <= 2 and -2 <= record["a_distance"] <= 2
        assert record["source_images"] == 36 and record["target_images"] == 12
        assert 0 <= record["test_acc"] <= 1
        facts = check_facts(record["run"], name)
        assert facts["stage"] == "eval" and facts["protocol"] == "domainbed"
        assert facts["precision"] == "fp32" and record["device"] == "cpu"
        assert facts["backbone"] == TINY["clip_model"] and facts["method"] == name
        assert facts["weights_digest"] == file_digest(sweep / name / "model.pkl")
    # ZSCLIP's features are the zero-shot model's: the same A-distance (same seed)
    assert records["ZSCLIP"]["a_distance"] == records["ZSCLIP"]["a_distance_zero_shot"]
    assert (sweep / "CLIPFT" / "domain_gap_tsne.png").stat().st_size > 1000
    assert not (sweep / "unfinished" / "domain_gap.json").exists()
    result = run([PY, "-m", "results.collect", str(sweep), "--out", str(tmp_path / "tables"),
                  "--no-figures"])
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "tables" / "domain_gap_CLIPWorld.md").read_text()
    assert "CLIPFT, env1" in table and "ZSCLIP, env1" in table
    assert f"These runs' backbone: {TINY['clip_model']}; precision: fp32." in table


def test_precision_is_the_one_asked_for_not_the_recorded_one(tmp_path):
    result = run([PY, "-m", "evaluation.domain_gap", str(tmp_path), "--device", "cpu",
                  "--precision", "fp64"])
    assert result.returncode == 2 and "invalid choice: 'fp64'" in result.stderr
    result = run([PY, "-m", "evaluation.domain_gap", str(tmp_path), "--device", "nodevice"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("domain_gap: error: --device nodevice --precision auto: ")


def test_domain_gap_records_by_setting_and_old_records_left_out(tmp_path):
    def write(name, precision, backbone="tiny-vit", facts=True, a=0.5):
        job = tmp_path / name
        job.mkdir()
        record = {"kind": "domain_gap", "algorithm": "CLIPFT", "dataset": "CLIPWorld",
                  "test_env": 1, "a_distance": a, "a_distance_zero_shot": 1.0,
                  "in_domain_acc": 0.9, "test_acc": 0.5}
        if facts:
            record["run"] = run_facts(protocol="domainbed", stage="eval", method="CLIPFT",
                                      precision=precision, backbone=backbone)
        (job / "domain_gap.json").write_text(json.dumps(record))
    write("a", "fp32", a=0.2)
    write("b", "bf16", a=0.6)
    write("old", "fp32", facts=False)
    kind = DomainGap()
    with pytest.warns(UserWarning, match="old/domain_gap.json: run: no run facts"):
        records = kind.load(sorted(tmp_path.rglob("domain_gap.json")))
    (table,) = kind.tables(records, [])
    rows = {r.label: r for r in table.rows}
    assert set(rows) == {"CLIPFT, env1 (tiny-vit, fp32)", "CLIPFT, env1 (tiny-vit, bf16)"}
    assert table.cell(rows["CLIPFT, env1 (tiny-vit, bf16)"], "A-distance, trained").mean == 0.6
    assert any("never pooled" in n for n in table.notes)


def test_no_finished_job_is_one_line_and_exit_2(tmp_path):
    result = run([PY, "-m", "evaluation.domain_gap", str(tmp_path), "--device", "cpu"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no finished DomainBed job" in result.stderr
