"""results/kind_pretraining.py makes tables from pretraining_eval records (seeds of one
method and model pooled into one row), and `python -m pretraining.compare` trains the three
methods through pretraining.imsep on a small generated world, evaluates them, tabulates
them and reuses its cached checkpoints on a rerun."""
import csv
import json

import pytest

from common.files import write_json_atomic
from results import collect
from results.kinds import kinds


def record(method, model, seed, top1_seen, r1, gap, precision="fp32"):
    from common.run_facts import run_facts
    facts = run_facts(protocol="pretraining", stage="eval", method=method, precision=precision,
                      backbone=model, dataset="world", seeds={"seed": seed})
    return {"kind": "pretraining_eval", "format": 1, "method": method, "model": model,
            "run": facts,
            "checkpoint": f"/x/{method}-{seed}.pt", "seed": seed, "tied": method != "CLIP",
            "templates": "openai_imagenet",
            "zeroshot": {"world/seen": {"top1": top1_seen, "top5": 50.0, "n": 720},
                         "world/painting": {"top1": 10.0, "top5": 50.0, "n": 240}},
            "retrieval": {"world/val-pairs": {"image_to_text": {"R@1": r1, "R@5": 30.0, "R@10": 40.0},
                                              "text_to_image": {"R@1": r1 / 2, "R@5": 20.0,
                                                                "R@10": 30.0},
                                              "n_images": 450, "n_captions": 900}},
            "linear_probe": {"world/seen": {"top1": 40.0}},
            "gap": {"world/val-pairs": {"n": 450, "centroid_distance": gap, "alignment_score": 0.5,
                                        "separation_score": 0.7, "mean_unpaired_cosine": 0.3,
                                        "uniformity_image": -2.0, "uniformity_text": -1.0}},
            "order": {"zeroshot": ["world/seen", "world/painting"]}}


def test_collector_kind_makes_tables_from_records(tmp_path, capsys):
    assert "pretraining" in kinds()
    runs = tmp_path / "runs"
    write_json_atomic(runs / "a" / "pretraining_eval.json",
                      record("AlignCLIP-IMSep", "tiny-sharedclip", 0, 30.0, 12.0, 0.1))
    write_json_atomic(runs / "b" / "pretraining_eval.json", record("CLIP", "tiny-clip-w64", 0, 20.0, 10.0, 0.4))
    write_json_atomic(runs / "c" / "pretraining_eval.json", record("CLIP", "tiny-clip-w64", 1, 30.0, 14.0, 0.2))
    write_json_atomic(runs / "d" / "pretraining_eval.json", {"kind": "other"})  # ignored
    no_facts = record("CLIP", "tiny-clip-w64", 2, 99.0, 99.0, 0.9)
    del no_facts["run"]  # left out, with one warning naming the file
    write_json_atomic(runs / "e" / "pretraining_eval.json", no_facts)
    out = tmp_path / "tables"
    assert collect.main([str(runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    warned = [l for l in captured.err.splitlines() if "no run facts" in l]
    assert len(warned) == 1 and f"{runs / 'e' / 'pretraining_eval.json'}: no run facts" in warned[0]
    names = sorted(p.stem for p in out.glob("*.md"))
    assert names == ["pretraining_gap_world_val_pairs", "pretraining_linear_probe",
                     "pretraining_retrieval_world_val_pairs", "pretraining_summary",
                     "pretraining_zeroshot"]
    summary = (out / "pretraining_summary.md").read_text().splitlines()
    header = next(l for l in summary if l.startswith("| Method"))
    assert header.split(" | ")[1:3] == ["ZS top-1 world/seen", "ZS top-1 world/painting"]
    rows = [l for l in summary if l.startswith("| CLIP") or l.startswith("| AlignCLIP")]
    # CLIP first (method order), its two seeds pooled: mean ± population std
    assert rows[0].startswith("| CLIP (tiny-clip-w64) | 25.00 ± 5.00 | 10.00 ± 0.00 | 12.00 ± 2.00 |")
    assert rows[1].startswith("| AlignCLIP-IMSep (tiny-sharedclip) | 30.00 | 10.00 | 12.00 |")
    with open(out / "pretraining_gap_world_val_pairs.csv") as f:
        gap = {(r["row"], r["column"]): r for r in csv.DictReader(f)}
    assert float(gap["CLIP (tiny-clip-w64)", "centroid distance"]["mean"]) == pytest.approx(0.3)
    assert gap["CLIP (tiny-clip-w64)", "centroid distance"]["n"] == "2"
    assert (out / "pretraining_retrieval_world_val_pairs.tex").is_file()
    assert "Retrieval on world/val-pairs" in text
    assert "Precision: fp32; backbone: tiny-clip-w64, tiny-sharedclip" in \
        (out / "pretraining_summary.md").read_text()


def test_runs_that_differ_in_precision_are_never_pooled():
    from results.kind_pretraining import PretrainingEval, load_records
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, precision in enumerate(("fp32", "bf16")):
            paths.append(Path(tmp) / f"{k}" / "pretraining_eval.json")
            write_json_atomic(paths[-1], record("CLIP", "tiny-clip-w64", 0, 20.0 + 10 * k, 10.0,
                                                0.4, precision))
        records = load_records(paths)
    summary = next(t for t in PretrainingEval().tables(records, []) if t.name == "pretraining_summary")
    assert [r.label for r in summary.rows] == ["CLIP (tiny-clip-w64, bf16)", "CLIP (tiny-clip-w64, fp32)"]
    assert all(c.n == 1 for r in summary.rows for c in r.cells if c.mean is not None)
    assert "Precision: bf16, fp32" in " ".join(summary.notes)


def test_compare_trains_evaluates_and_caches_the_three_methods(tmp_path, capsys):
    from clipworld import generate
    from pretraining import compare
    world = tmp_path / "world"
    generate.generate_world(world, seed=0, image_size=64, per_class_domain=3,
                            compositional_per_class=1, pretrain_per_class_domain=2)
    argv = ["--world", str(world), "--epochs", "1", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--quiet"]
    assert compare.main(argv) == 0
    text = capsys.readouterr().out
    for label in ("CLIP (tiny-clip-w64)", "SharedCLIP (tiny-sharedclip)",
                  "AlignCLIP-IMSep (tiny-sharedclip)"):
        assert f"| {label} |" in text
    records = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
               for p in (tmp_path / "out").glob("*/pretraining_eval.json")}
    assert set(records) == {"CLIP", "SharedCLIP", "AlignCLIP-IMSep"}
    assert {m: r["tied"] for m, r in records.items()} == \
        {"CLIP": False, "SharedCLIP": True, "AlignCLIP-IMSep": True}
    for r in records.values():
        assert set(r["zeroshot"]) == {"world/seen", "world/painting"}
        assert set(r["retrieval"]) == set(r["gap"]) == {"world/val-pairs"}
    reports = {json.loads(p.read_text())["method"]: json.loads(p.read_text())
               for p in (tmp_path / "cache").glob("*/train.json")}
    # same data, steps and seed; only the model and the loss flags differ
    assert len({json.dumps({**r["config"], "model": None}, sort_keys=True)
                for r in reports.values()}) == 1
    assert reports["AlignCLIP-IMSep"]["flags"] == ["--clip-inModality-loss",
                                                   "--nl_semantic_supervision"]
    logs = {m: (tmp_path / "cache" / r["key"] / "logs" / "train" / "out.log").read_text()
            for m, r in reports.items()}
    assert "IMSepLoss(" in logs["AlignCLIP-IMSep"] and "IMSepLoss(" not in logs["SharedCLIP"]
    assert (tmp_path / "out" / "projection_seed0.png").is_file()
    assert (tmp_path / "out" / "tables" / "pretraining_summary.md").is_file()
    assert not list(world.rglob("*.sentemb.*"))  # the world is left as it was
    # a rerun reuses the checkpoints
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*/model.pt")}
    assert compare.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*/model.pt")} == stamps
