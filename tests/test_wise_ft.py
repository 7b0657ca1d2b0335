"""WiSE-FT: the interpolation (algorithms/wise_ft.py), its ends against ZSCLIP and the
fine-tuned model, the post-hoc job over DomainBed jobs (evaluation/wise_ft.py) and the
alphas the collector chooses (results/kind_domainbed.py)."""
import csv
import json
from pathlib import Path

import pytest
import torch

from algorithms import backbone, wise_ft
from common.run_facts import check_facts, file_digest, run_facts
from tests.conftest import PY, TINY, job_records, needs_domainbed, run, train_domainbed


# --- the rule, by hand ------------------------------------------------------------------

def test_interpolation_of_a_hand_made_pair_of_state_dicts():
    zero_shot = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0, -2.0]),
                 "step": torch.tensor(3)}
    fine_tuned = {"w": torch.tensor([[3.0, 2.0], [-1.0, 0.0]]), "b": torch.tensor([4.0, 2.0]),
                  "step": torch.tensor(7)}
    theta = wise_ft.interpolate(zero_shot, fine_tuned, 0.25)
    assert torch.equal(theta["w"], torch.tensor([[1.5, 2.0], [2.0, 3.0]]))
    assert torch.equal(theta["b"], torch.tensor([1.0, -1.0]))
    assert theta["step"].item() == 7  # counters are the fine-tuned model's
    odd = {"w": torch.tensor([0.1, -0.3, 1e-8]), "b": torch.tensor([7.7])}
    other = {"w": torch.tensor([-2.9, 0.7, 3e5]), "b": torch.tensor([-1e-3])}
    for key in odd:  # exact at both ends, whatever the values
        assert torch.equal(wise_ft.interpolate(odd, other, 0.0)[key], odd[key])
        assert torch.equal(wise_ft.interpolate(odd, other, 1.0)[key], other[key])
    with pytest.raises(ValueError, match="different tensors"):
        wise_ft.interpolate(zero_shot, {"w": fine_tuned["w"]}, 0.5)
    with pytest.raises(ValueError, match="b is"):
        wise_ft.interpolate(zero_shot, {**fine_tuned, "b": torch.zeros(3)}, 0.5)


def test_the_grid_and_the_zero_shot_start_of_a_head():
    from algorithms.core.registry import get_method
    assert wise_ft.DEFAULT_ALPHAS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert wise_ft.check_alphas([1, 0, 0.5, 0.5]) == (0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]; got 1.5"):
        wise_ft.check_alphas([0, 1.5])
    assert wise_ft.zero_shot_values(get_method("CLIPLP"), {"lr": 1.0}) == {
        "lr": 1.0, "lp_init": "zeroshot"}
    assert wise_ft.zero_shot_values(get_method("CLIPFT"), {"lr": 1.0}) == {"lr": 1.0}


# --- the ends, exactly, on the generated world ------------------------------------------

def world_batch(small_world):
    root = Path(small_world["domainbed_root"]) / "clip_world"
    domains = sorted(p for p in root.iterdir() if p.is_dir())
    classes = sorted(p.name for p in domains[0].iterdir() if p.is_dir())
    transform = backbone.clip_transform(backbone.image_size_of(TINY["clip_model"]), False)
    from PIL import Image
    images, labels = [], []
    for domain in domains[:2]:
        for label, name in enumerate(classes):
            path = sorted((domain / name).iterdir())[0]
            images.append(transform(Image.open(path).convert("RGB")))
            labels.append(label)
    return classes, torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_clip):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(tiny_clip[0].state_dict(), path)
    return str(path)


@pytest.mark.parametrize("source", ["CLIPFT", "CLIPood"])
def test_alpha_0_is_zsclip_and_alpha_1_the_fine_tuned_model_exactly(source, small_world,
                                                                    tiny_weights):
    from algorithms.core.registry import get_method
    classes, images, labels = world_batch(small_world)
    values = {**TINY, "clip_pretrained": tiny_weights, "lr": 1e-3}
    torch.manual_seed(0)
    trained = get_method(source).create(classes, values, device="cpu", total_steps=3)
    for _ in range(3):
        trained.update(images, labels)
    trained.eval()
    ensemble = wise_ft.WeightSpaceEnsemble(
        get_method(source).create(classes, values, device="cpu", total_steps=3),
        trained.state_dict())
    zsclip = get_method("ZSCLIP").create(classes, {**TINY, "clip_pretrained": tiny_weights},
                                         device="cpu").eval()
    with torch.no_grad():
        zero_shot, fine_tuned = zsclip.predict(images), trained.predict(images)
        assert not torch.equal(zero_shot, fine_tuned)  # training moved the weights
        assert torch.equal(ensemble.at(0.0).eval().predict(images), zero_shot)
        assert torch.equal(ensemble.at(1.0).eval().predict(images), fine_tuned)
        halfway = ensemble.at(0.5).eval().predict(images)
        assert not torch.equal(halfway, zero_shot) and not torch.equal(halfway, fine_tuned)
        assert torch.equal(ensemble.at(0.0).predict(images), zero_shot)  # and back


# --- hand-made DomainBed records: which alpha each selection chooses --------------------

DOMAINS = ["cartoon", "painting", "photo"]


def write_job(folder: Path, algorithm: str, rows, *, done=True, source=None, steps=None):
    """A DomainBed job folder: one record per (alpha or None, train-env out acc, test out
    acc, test in acc) row, test domain 1 of three."""
    folder.mkdir(parents=True)
    lines = []
    for step, (alpha, val, test_out, test_in) in enumerate(rows):
        facts = run_facts(protocol="domainbed", stage="eval" if source else "train",
                          method=algorithm, precision="fp32", backbone="tiny-vit",
                          dataset="CLIPWorld", domains=DOMAINS, test_domains=[DOMAINS[1]],
                          seeds={"trial_seed": 0, "hparams_seed": 0},
                          steps=steps or len(rows))
        args = {"algorithm": algorithm, "dataset": "CLIPWorld", "test_envs": [1],
                "hparams_seed": 0, "trial_seed": 0}
        hparams = {"clip_model": "tiny-vit", "run": facts}
        if source:
            args["source_algorithm"] = source
            hparams["alpha"] = alpha
        lines.append(json.dumps({
            "args": args, "hparams": hparams, "step": step,
            "env0_in_acc": 0.9, "env0_out_acc": val, "env1_in_acc": test_in,
            "env1_out_acc": test_out, "env2_in_acc": 0.9, "env2_out_acc": val}))
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    if done:
        (folder / "done").write_text("done\n")


@needs_domainbed
def test_training_domain_validation_and_oracle_choose_alpha_as_a_hyperparameter(tmp_path):
    from results import kind_domainbed
    sweep = tmp_path / "sweep"
    # alpha:            0     0.5   1     (train-domain val best at 0.5, test-domain val at 0)
    write_job(sweep / "a-WiSE-FT", "WiSE-FT(CLIPFT)",
              [(0.0, 0.50, 0.80, 0.75), (0.5, 0.70, 0.60, 0.65), (1.0, 0.60, 0.40, 0.45)],
              source="CLIPFT")
    write_job(sweep / "b-WiSE-FT", "WiSE-FT(CLIPood)",
              [(0.0, 0.50, 0.30, 0.35), (0.5, 0.40, 0.50, 0.55), (1.0, 0.90, 0.20, 0.25)],
              source="CLIPood")
    kind = kind_domainbed.DomainBed()
    tables = {t.name: t for t in kind.tables(kind.load(sorted(sweep.rglob("results.jsonl"))),
                                             [])}
    chosen = tables["domainbed_wise_ft_CLIPWorld"]
    rows = {r.label: r for r in chosen.rows}
    assert set(rows) == {"WiSE-FT(CLIPFT), painting", "WiSE-FT(CLIPood), painting"}
    values = {label: [c.mean for c in row.cells] for label, row in rows.items()}
    assert chosen.columns == ["alpha (training-domain validation)",
                              "accuracy (training-domain validation)",
                              "alpha (oracle)", "accuracy (oracle)"]
    assert values["WiSE-FT(CLIPFT), painting"] == pytest.approx([0.5, 65.0, 0.0, 75.0])
    assert values["WiSE-FT(CLIPood), painting"] == pytest.approx([1.0, 25.0, 0.5, 55.0])
    # the oracle table, labelled so, holds the oracle alpha's accuracy, not alpha 1's
    oracle = tables["domainbed_oracle_CLIPWorld"]
    assert "(oracle)" in oracle.title
    row = next(r for r in oracle.rows if r.label == "WiSE-FT(CLIPFT)")
    assert oracle.cell(row, "painting").mean == pytest.approx(75.0)
    iid = tables["domainbed_iid_CLIPWorld"]
    row = next(r for r in iid.rows if r.label == "WiSE-FT(CLIPood)")
    assert iid.cell(row, "painting").mean == pytest.approx(25.0)
    curves = kind_domainbed.wise_ft_curves(kind.load(sorted(sweep.rglob("results.jsonl"))).records)
    assert curves["CLIPWorld"]["WiSE-FT(CLIPFT)"][0.5] == pytest.approx((70.0, 65.0))
    figures = kind.figures(kind.load(sorted(sweep.rglob("results.jsonl"))), [], tmp_path / "out")
    assert [p.name for p in figures] == ["domainbed_wise_ft_CLIPWorld_curve.png"]
    assert figures[0].stat().st_size > 1000


# --- the post-hoc job on a real DomainBed job --------------------------------------------

def train(sweep: Path, algorithm: str, world, weights: str, steps: int):
    hparams = {**TINY, "clip_pretrained": weights, "batch_size": 8, "lr": 1e-3}
    result = train_domainbed(algorithm, world, sweep / algorithm, hparams, "--test_envs", "1",
                             "--steps", steps, cwd=sweep.parent)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    return job_records(sweep / algorithm)


def wise(*args):
    return run([PY, "-m", "evaluation.wise_ft", *map(str, args)])


@needs_domainbed
def test_a_clipft_job_then_wise_ft_then_the_collector(small_world, tiny_weights, tmp_path):
    sweep = tmp_path / "sweep"
    source = train(sweep, "CLIPFT", small_world, tiny_weights, 3)
    zero_shot = train(sweep, "ZSCLIP", small_world, tiny_weights, 1)
    (sweep / "unfinished").mkdir()
    result = wise("--input_dir", sweep, "--alphas", "0", "0.5", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 job(s) evaluated at 3 alphas on cpu, 0 already done, 1 unfinished" in result.stderr
    job = sweep / "CLIPFT-WiSE-FT"
    assert (job / "done").exists() and not (sweep / "ZSCLIP-WiSE-FT").exists()
    records = job_records(job)
    assert [r["hparams"]["alpha"] for r in records] == [0.0, 0.5, 1.0]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert r["args"]["algorithm"] == "WiSE-FT(CLIPFT)"
        assert r["args"]["source_algorithm"] == "CLIPFT"
        facts = check_facts(r["hparams"]["run"], "hparams.run")
        assert facts["weights_digest"] == file_digest(sweep / "CLIPFT" / "model.pkl")
        assert facts["config"]["source_job"] == "CLIPFT" and facts["steps"] == 3
        assert facts["config"]["alpha"] == r["hparams"]["alpha"] and facts["stage"] == "eval"
    # the ends on the job's own splits: the test domain and the held-out images (read
    # without augmentation) as the zero-shot job and the fine-tuned job scored them
    for key in ("env1_in_acc", "env1_out_acc", "env0_out_acc", "env2_out_acc"):
        assert records[0][key] == zero_shot[-1][key], key
        assert records[-1][key] == source[-1][key], key
    stamp = (job / "results.jsonl").stat().st_mtime_ns
    again = wise("--input_dir", sweep, "--alphas", "0", "0.5", "1", "--device", "cpu")
    assert again.returncode == 0 and "0 job(s) evaluated at 3 alphas on cpu, 1 already done" \
        in again.stderr
    assert (job / "results.jsonl").stat().st_mtime_ns == stamp

    out = tmp_path / "tables"
    result = run([PY, "-m", "results.collect", str(sweep), "--out", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    table = (out / "domainbed_wise_ft_CLIPWorld.md").read_text()
    assert "| WiSE-FT(CLIPFT), painting |" in table and "alpha (oracle)" in table
    with open(out / "domainbed_wise_ft_CLIPWorld.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    oracle_alpha = float(next(c["mean"] for c in cells if c["column"] == "alpha (oracle)"))
    best = max(r["env1_out_acc"] for r in records)
    assert next(r for r in records if r["hparams"]["alpha"] == oracle_alpha)["env1_out_acc"] == best
    assert (out / "domainbed_wise_ft_CLIPWorld_curve.png").stat().st_size > 1000


# --- bad input: one line ----------------------------------------------------------------

@needs_domainbed
def test_bad_input_is_one_line(tmp_path):
    sweep = tmp_path / "sweep"
    write_job(sweep / "finished", "CLIPFT", [(None, 0.5, 0.5, 0.5)])  # done, no model.pkl
    write_job(sweep / "running", "CLIPFT", [(None, 0.5, 0.5, 0.5)], done=False, steps=5)
    result = wise("--input_dir", sweep, "--device", "cpu")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("wise_ft: error: 1 job(s) not evaluated; first: ")
    assert "finished but no model.pkl" in lines[-1] and "1 unfinished left alone" in lines[-2]
    result = wise("--input_dir", sweep / "running", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip() == \
        f"wise_ft: error: {sweep / 'running'}: job not finished (no `done`)"
    for args, message in ((["--alphas", "0", "1.5"], "--alphas: WiSE-FT: alphas must be"),
                          (["--input_dir", tmp_path / "none"], "no such folder")):
        argv = ["--input_dir", sweep, *args] if args[0] == "--alphas" else args
        result = wise(*argv, "--device", "cpu")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = wise("--input_dir", empty, "--device", "cpu")
    assert result.returncode == 2 and "no finished job of a trained harness method" in \
        result.stderr.strip().splitlines()[-1]
