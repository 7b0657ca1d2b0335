"""results/domain_gap.py: tllib's A-distance and t-SNE over finished DomainBed jobs."""
import json

import pytest

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
    result = run([PY, "-m", "results.domain_gap", str(sweep), "--images-per-domain", "12",
                  "--out", str(tmp_path / "tables")])
    assert result.returncode == 0, result.stderr[-2000:]
    records = {name: json.loads((sweep / name / "domain_gap.json").read_text())
               for name in ("ZSCLIP", "CLIPFT")}
    for record in records.values():
        assert 0 <= record["a_distance_zero_shot"] <= 2 and -2 <= record["a_distance"] <= 2
        assert record["source_images"] == 36 and record["target_images"] == 12
        assert 0 <= record["test_acc"] <= 1
    # ZSCLIP's features are the zero-shot model's: the same A-distance (same seed)
    assert records["ZSCLIP"]["a_distance"] == records["ZSCLIP"]["a_distance_zero_shot"]
    assert (sweep / "CLIPFT" / "domain_gap_tsne.png").stat().st_size > 1000
    table = (tmp_path / "tables" / "domain_gap_CLIPWorld.md").read_text()
    assert "CLIPFT, env1" in table and "ZSCLIP, env1" in table
    assert not (sweep / "unfinished" / "domain_gap.json").exists()


def test_no_finished_job_is_one_line_and_exit_2(tmp_path):
    result = run([PY, "-m", "results.domain_gap", str(tmp_path)])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no finished DomainBed job" in result.stderr
