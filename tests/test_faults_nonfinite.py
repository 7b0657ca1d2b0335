"""A non-finite loss stops the job at that step, with one line naming the method, the step
and the loss term(s), and leaves no `done` file (DomainBed) / results.json (Dassl)."""
import json

import pytest
import torch

from tests.conftest import PY, REPO, TINY, job_records, needs_coop, needs_domainbed, run

ALIGNCLIP_TINY = {"aligned_layers": 2, "dv_layers": 2}  # tiny-vit has 4 blocks


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@needs_domainbed
def test_domainbed_job_stops_at_the_nonfinite_step(small_world, tmp_path):
    """lr 1e20: step 0 is finite and recorded, its update makes the weights overflow, step 1
    is refused: the job ends there, naming method, step and every non-finite term."""
    out = tmp_path / "job"
    hparams = {**TINY, **ALIGNCLIP_TINY, "batch_size": 4, "lr": 1e20}
    result = run([PY, "-m", "domainbed.scripts.train", "--algorithm", "AlignCLIP",
                  "--dataset", "CLIPWorld", "--data_dir", small_world["domainbed_root"],
                  "--test_envs", "0", "--steps", "5", "--checkpoint_freq", "1",
                  "--output_dir", str(out), "--hparams", json.dumps(hparams)],
                 cwd=tmp_path, env={"CLIPBENCH_CACHE": "off"}, timeout=300)
    assert result.returncode != 0
    message = ("FloatingPointError: AlignCLIP: non-finite loss at step 1: loss_cls = nan, "
               "loss_aal = nan, loss_last = nan; the job stops here")
    output = result.stdout + result.stderr  # train.py tees its stderr into its stdout
    assert last_line(output) == message, output[-2000:]
    assert last_line((out / "err.txt").read_text()) == message
    records = job_records(out)
    assert [r["step"] for r in records] == [0]  # nothing recorded past the refused step
    assert not (out / "done").exists() and not (out / "model.pkl").exists()


@needs_domainbed
def test_domainbed_adapter_names_the_one_nonfinite_term(monkeypatch):
    """Only the attention-alignment term goes NaN at the third step: the message names it
    (not the others), the step is DomainBed's, and the refused step changed no weight."""
    import domainbed.algorithms
    import domainbed.hparams_registry
    from algorithms import alignclip
    from domainbed_adapter import patches
    patches.patch_loaded()
    hparams = dict(domainbed.hparams_registry.default_hparams("AlignCLIP", "CLIPWorld"),
                   **TINY, **ALIGNCLIP_TINY, class_names=["circle", "square", "star"])
    torch.manual_seed(0)
    algorithm = domainbed.algorithms.get_algorithm_class("AlignCLIP")((3, 64, 64), 3, 3, hparams)
    batch = [(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]))]
    for _ in range(2):
        assert torch.isfinite(torch.tensor(algorithm.update(batch)["loss_aal"]))
    weights = {k: v.clone() for k, v in algorithm.method.visual.state_dict().items()}
    upstream = alignclip.attention_alignment_loss
    monkeypatch.setattr(alignclip, "attention_alignment_loss",
                        lambda a, g: upstream(a, g) * float("nan"))
    with pytest.raises(FloatingPointError) as error:
        algorithm.update(batch)
    assert str(error.value) == ("AlignCLIP: non-finite loss at step 2: loss_aal = nan; "
                                "the job stops here")
    after = algorithm.method.visual.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())


@needs_coop
def test_dassl_run_stops_at_the_nonfinite_step_without_results(small_world, tmp_path):
    """SLS epsilon NaN (a YAML .nan in the config): the classification term is NaN at the
    first batch; train_coop.py ends with one line, and neither a checkpoint nor
    results.json is written."""
    backbone = (REPO / "trainers" / "configs" / "backbones" / "tiny_vit.yaml").read_text()
    config = tmp_path / "tiny_vit_nan.yaml"
    config.write_text(backbone + "TRAINER:\n  ALIGNCLIP:\n    SLS_EPSILON: .nan\n")
    out = tmp_path / "run"
    result = run([PY, "train_coop.py", "--trainer", "AlignCLIP", "--root", small_world["coop_root"],
                  "--dataset-config-file", str(REPO / "trainers" / "configs" / "datasets" /
                                               "clip_world.yaml"),
                  "--config-file", str(config), "--output-dir", str(out), "--seed", "1",
                  "DATASET.NUM_SHOTS", "2", "DATASET.SUBSAMPLE_CLASSES", "base"],
                 env={"CLIPBENCH_CACHE": "off"}, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert last_line(result.stderr).startswith(
        "train_coop.py: error: FloatingPointError: AlignCLIP: non-finite loss at epoch 1, "
        "batch 1 (step 0): loss_cls = nan; the job stops here"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (out / "results.json").exists()
    assert not list(out.glob("model/model.pth.tar-*"))
